"""The vLLM environment on the host: a separate Python with vLLM installed, where vLLM's own code checks
what the runner would otherwise judge by its reading of vLLM's rules.

Two scripts run inside it (they import vLLM, torch and the standard library, nothing else of the runner):
- load_check: vLLM's loader builds each export into vLLM's model on the CPU (every checkpoint tensor
  must land in a parameter and every parameter must be loaded);
- args_check: a recipe's `serve.args` parsed by vLLM's own `vllm serve` parser, and its tool-call and
  reasoning parsers looked up in vLLM's registries.

The environment is found from the recipe (`verify.vllm_loader.python`), then $RECIPE_VLLM_PYTHON (`none`:
look for none), then `.venv-vllm/bin/python` in the current directory. None there is not a pass: the
check is "not run".
The host side never imports vLLM or torch; it starts the interpreter and reads the JSON it writes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.processes import die_with_parent, terminate_group, worker_pythonpath
from runner.recipe.schema import VllmLoaderCheck

ENV_VAR = "RECIPE_VLLM_PYTHON"
DEFAULT_PYTHON = Path(".venv-vllm") / "bin" / "python"
BUILD_COMMAND = "bash containers/vllm-loader-env.sh .venv-vllm"
# What the scripts see of the host's environment: no tokens, no proxies, nothing of the user's shell.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


@dataclass(frozen=True)
class VllmEnvironment:
    python: str  # absolute path of the interpreter
    version: str  # vLLM's version there

    def describe(self) -> str:
        return f"vLLM {self.version} at {self.python}"


def _interpreter(spec: VllmLoaderCheck) -> tuple[Path, str]:
    if spec.python:
        return Path(spec.python).expanduser(), "verify.vllm_loader.python"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"  # `none`: a path that is not there
    return DEFAULT_PYTHON, "the default"


def find(spec: VllmLoaderCheck) -> tuple[VllmEnvironment | None, str]:
    """The environment the recipe checks with, or None and why not (said as the check's "not run" reason)."""
    if not spec.enabled:
        return None, "verify.vllm_loader.enabled is false"
    python, source = _interpreter(spec)
    if str(python) == "none":
        return None, f"${ENV_VAR} is `none`: no vLLM environment is looked for"
    if not python.is_file():
        return None, (f"no vLLM environment: {python} ({source}) does not exist; `{BUILD_COMMAND}` builds one, "
                      f"or set verify.vllm_loader.python / ${ENV_VAR} to an interpreter with vLLM installed")
    python = python.absolute()  # not resolve(): a venv's python is a symlink to the base interpreter
    try:
        found = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
                               capture_output=True, text=True, timeout=60, env=_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{python} ({source}) did not run: {exc}"
    if found.returncode != 0:
        return None, f"{python} ({source}) has no vLLM installed ({_last_line(found.stderr)})"
    version = found.stdout.strip()
    if spec.version and version != spec.version:
        return None, (f"{python} has vLLM {version}, the recipe serves with {spec.version} "
                      "(verify.vllm_loader.version): a loader of another version does not check what will be served")
    return VllmEnvironment(str(python), version), ""


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    # vLLM resolves its CPU platform; nothing reaches for the Hub; the runner's own package is importable.
    env |= {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": worker_pythonpath(None), "PYTHONUNBUFFERED": "1"}
    return env


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


async def load_check(env: VllmEnvironment, checkpoints: list[Path], out: Path, log_path: Path,
                     timeout_s: float, language_model_only: bool = False) -> dict[str, Any]:
    """vLLM's loader on each checkpoint, in one process; its JSON (runner/vllm_env/load_check.py) is written
    to `out` and returned. vLLM's log goes to `log_path`. Raises RuntimeError when the script itself fails.
    `language_model_only`: as the recipe serves (`vllm serve --language-model-only`: no vision tower built)."""
    argv = [env.python, "-m", "runner.vllm_env.load_check", "--out", str(out),
            *(["--language-model-only"] if language_model_only else []), *map(str, checkpoints)]
    out.unlink(missing_ok=True)
    rc, tail = await _run(argv, log_path, timeout_s)
    if not out.is_file():  # exit 1 with the file: a checkpoint was refused, which is the finding
        raise RuntimeError(f"vLLM's load check exited with {rc} before writing its result: {tail}")
    return json.loads(out.read_text(encoding="utf-8"))


async def _run(argv: list[str], log_path: Path, timeout_s: float) -> tuple[int | None, str]:
    with log_path.open("a", encoding="utf-8") as log:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log, start_new_session=True,
                                                    env=_env(), preexec_fn=die_with_parent())
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            await terminate_group(proc)
            return None, f"timed out after {timeout_s:g} s (verify.vllm_loader.timeout_s)"
        except asyncio.CancelledError:
            await terminate_group(proc)
            raise
    return rc, _last_line(log_path.read_text(encoding="utf-8", errors="replace"))


def verdict(found: dict[str, Any], engine: str, runs_vllm: bool) -> dict[str, Any]:
    """The verify check's record of one export from load_check's JSON: pass, fail (vLLM's error, the tensors
    no parameter took and the parameters nothing loaded, each named once), not_run (vLLM has no CPU path for
    the layout: nothing is known of the export), or warn where an engine other than vLLM serves
    (`runs_vllm`: whether the recipe's engine, `engine`, serves with vLLM: Engine.runs_vllm)."""
    (one,) = found["results"]
    where = f"vLLM {found['vllm_version']}'s loader on {found.get('device', 'cpu').upper()}"
    base = {"vllm_version": found["vllm_version"], "device": found.get("device", "cpu"),
            "seconds": one.get("seconds"), "quant_config": one.get("quant_config"), "modules": one.get("modules")}
    if one.get("unsupported_on_cpu"):  # vLLM lacks a CPU path for this layout: nothing known of the export
        return base | {"status": "not_run", "detail": f"{where} cannot build this model here: "
                                                      f"{one['unsupported_on_cpu']}"}
    if one["ok"]:
        modules = one.get("modules") or {}
        return base | {"status": "pass", "detail": (
            f"loaded by {where} ({one.get('quant_config') or 'unquantized'}: {modules.get('quantized', 0)} quantized, "
            f"{modules.get('unquantized', 0)} unquantized linear layers; every tensor landed in a parameter and "
            f"every parameter was loaded) in {one.get('seconds', 0):.1f} s"
            + "".join(f"; {n} tensors of the {stage} not built, as served (--language-model-only)"
                      for stage, n in (one.get("skipped_by_vllm") or {}).items())
            + (f"; {one['post_load_skipped']}" if one.get("post_load_skipped") else ""))}
    problems = []
    if one.get("error"):
        problems.append(one["error"])
    for key, words in (("unused_tensors", "checkpoint tensors no parameter took"),
                       ("unloaded_params", "parameters nothing loaded")):
        names = one.get(key) or []
        if names and names[0] not in (one.get("error") or ""):  # vLLM's message may list them already
            problems.append(f"{len(names)} {words}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    refused = "; ".join(problems) or "refused without a reason"
    if not runs_vllm:
        return base | {"status": "warn", "detail": f"{where} refuses it ({engine} serves it): {refused}"}
    return base | {"status": "fail", "detail": f"{where}: {refused}"}


def check_args(env: VllmEnvironment, args: list[str], timeout_s: float = 300) -> dict[str, Any]:
    """`serve.args` judged by vLLM's own `vllm serve` parser and parser registries (runner/vllm_env/args_check.py)."""
    found = subprocess.run([env.python, "-m", "runner.vllm_env.args_check", json.dumps(args)],
                           capture_output=True, text=True, timeout=timeout_s, env=_env())
    try:
        return json.loads(found.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        why = _last_line(found.stderr)
        raise RuntimeError(f"vLLM's argument check exited with {found.returncode}: {why}") from None


if __name__ == "__main__":  # `python -m runner.vllm_env.environment`: which environment a recipe would use
    environment, why = find(VllmLoaderCheck())
    print(environment.describe() if environment else f"not found: {why}")
    sys.exit(0 if environment else 1)


def serve_args_problems(loaded: Any, runs_vllm: bool) -> tuple[list[Any], str]:
    """A recipe's `serve.args` as the pinned vLLM reads them: (problems at serve.args[i], a line saying
    which vLLM checked them or why none did). Only where the recipe's engine serves with vLLM (`runs_vllm`)."""
    from runner.errors import Problem
    from runner.recipe.loader import locate

    recipe = loaded.recipe
    if not runs_vllm:
        return [], ""
    env, why = find(recipe.verify.vllm_loader)
    if env is None:
        return [], f"serve.args not checked by vLLM's own parser: {why}"
    try:
        found = check_args(env, list(recipe.serve.args))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return [], f"serve.args not checked by vLLM's own parser: {exc}"
    problems = []
    for error in found.get("errors") or []:
        flag = error.get("flag")
        index = next((i for i, a in enumerate(recipe.serve.args) if flag and (a == flag or a.startswith(flag + "="))),
                     None)
        path: tuple[str | int, ...] = ("serve", "args", index) if index is not None else ("serve", "args")
        valid = error.get("valid")
        problems.append(Problem(f"vLLM {found.get('vllm_version', env.version)} refuses it: {error.get('message')}",
                                path, locate(loaded.locations, path),
                                hint=f"valid: {', '.join(valid)}" if valid else None))
    notes = "".join(f"; {note}" for note in found.get("notes") or [])
    return problems, (f"serve.args checked by the `vllm serve` parser and parser registries of {env.describe()}"
                      + notes)
