"""YAML files read into a tree that remembers where every value came from.

Recipes are merged from several files (`extends:`), interpolated and then validated; errors found at
any stage must still name the file, line and column the user wrote. Every node of the tree carries
its Location, and `to_plain` turns the tree into plain Python data plus a map from key path to
Location.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, events, nodes
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.error import MarkedYAMLError

from runner.errors import Location, Problem, RecipeError

KeyPath = tuple[str | int, ...]


@dataclass
class Node:
    """A YAML value (dict of Nodes, list of Nodes or a scalar) and where it was written."""

    value: Any
    loc: Location
    # Where a mapping's keys were written (for errors about a key rather than its value).
    key_locs: dict[str, Location] = field(default_factory=dict)


class SourcedStr(str):
    """A string from a recipe file that remembers the directory of that file.

    Path fields resolve relative values against it, so a path written in a base recipe is relative
    to the base recipe, not to the recipe that extends it.
    """

    base_dir: Path

    def __new__(cls, value: str, base_dir: Path) -> SourcedStr:
        obj = super().__new__(cls, value)
        obj.base_dir = base_dir
        return obj


def read_yaml(path: Path) -> Node:
    """Parse one YAML file (YAML 1.2) into a Node tree. Syntax errors become located RecipeErrors."""
    start = Location(str(path), 1, 1)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)  # bounded: a huge file or a device is refused without reading it all
    except OSError as exc:
        raise RecipeError([Problem(f"cannot read file: {exc.strerror}", location=start)]) from None
    if len(raw) > MAX_BYTES:
        raise RecipeError([Problem(f"the file is larger than {MAX_BYTES >> 20} MiB, the most a recipe may be",
                                   location=start, hint="a recipe with 10,000 strategies is 0.8 MiB; split the file "
                                   "with `extends:` or check that this is the file you meant")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem(f"the file is not UTF-8 text (byte {exc.start})", location=start)]) from None
    # Compose with libyaml's parser (ruamel.yaml.clib) and build the tree from the nodes, which carry
    # their marks: seven times faster than ruamel's round-trip loader on a recipe with 10,000
    # strategies, with ruamel's YAML 1.2 scalars. libyaml parses YAML 1.1, which refuses some valid
    # 1.2 (a `?` ending a plain scalar in a flow mapping: `{prompt: Why?, expect: [x]}`), so a file
    # it refuses is parsed again by ruamel's own parser, which also words the error if there is one.
    try:
        return _compose(text, path, pure=False)
    except MarkedYAMLError:
        pass
    try:
        return _compose(text, path, pure=True)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Location(str(path), mark.line + 1, mark.column + 1) if mark else Location(str(path), 1, 1)
        raise RecipeError([Problem(f"YAML syntax error: {exc.problem or exc.context}", location=loc)]) from None


# Bounds on what one file may make the loader build (issue 30: a 1.5 KB "billion laughs" alias bomb ran 28 s
# and ended in MemoryError; 50,000 nested brackets crash libyaml's composer with a segmentation fault).
# A recipe with 10,000 strategies (the scale the runner is built for, bench/scale_strategies.py) is 0.8 MiB
# and 80,000 values; the limits leave 2.5x and 6x room above it. Building the tree costs about 10 us a value
# (18 us as written, 8 us repeated by aliases), so a file at the limits loads in seconds, and one beyond them
# is refused by a pass over the parser's events (1 us a value) or over the composed nodes, aliases not
# followed, before anything is built.
MAX_BYTES = 2 << 20
MAX_VALUES = 500_000  # keys, values and list items, counted with every alias expanded
MAX_DEPTH = 100  # nesting; a recipe nests about 8 deep


def _compose(text: str, path: Path, pure: bool) -> Node:
    # First the parser's events, flat: libyaml's composer recurses in C (crashing at 50,000 levels) and
    # ruamel's in Python (RecursionError at 1,000), and composing a million values takes seconds.
    _check_events(YAML(typ="safe", pure=pure).parse(text), str(path))
    yaml = YAML(typ="safe", pure=pure)
    root = yaml.compose(text)
    if root is None:
        return Node({}, Location(str(path), 1, 1))
    if "&" in text:  # an anchor: aliases may repeat it (a file without one expands to what it says)
        _check_expansion(root, str(path))
    return _to_node(root, yaml.constructor, str(path), Location(str(path), 1, 1), 1)


def _too_big(what: str, node_or_event: Any, file: str, hint: str) -> RecipeError:
    return RecipeError([Problem(what, location=_mark(node_or_event, file), hint=hint)])


_TOO_MANY_HINT = ("a recipe with 10,000 strategies holds 80,000; split the file with `extends:` or check that "
                  "this is the file you meant")
_TOO_DEEP_HINT = "a recipe nests a few levels; check that this is the file you meant"


def _check_events(events_: Any, file: str) -> None:
    """Refuse more than MAX_VALUES values as written, or nesting deeper than MAX_DEPTH, from the parser's
    events (one flat pass, before anything recurses or is built)."""
    depth = 0
    count = 0
    for event in events_:
        if isinstance(event, events.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _too_big(f"values nest more than {MAX_DEPTH} deep, the most a recipe may", event, file,
                               _TOO_DEEP_HINT)
        elif isinstance(event, events.CollectionEndEvent):
            depth -= 1
            continue
        elif not isinstance(event, events.ScalarEvent | events.AliasEvent):
            continue
        count += 1
        if count > MAX_VALUES:
            raise _too_big(f"the file holds more than {MAX_VALUES:,} values (keys, values and list items), the "
                           "most a recipe may", event, file, _TOO_MANY_HINT)


def _check_expansion(root: nodes.Node, file: str) -> None:
    """Refuse a document that expands, aliases followed, to more than MAX_VALUES values or MAX_DEPTH levels,
    or whose alias refers to the collection that holds it, before anything is expanded.

    An alias is the node its anchor names, shared, so each node's expanded size and height are computed once
    (bottom up, without recursion): the cost is that of the file as written, whatever it would expand to."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    open_: set[int] = set()  # the nodes being computed: the ancestors of the one at hand
    stack: list[tuple[nodes.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = ([n for pair in node.value for n in pair] if isinstance(node, nodes.MappingNode)
                    else node.value if isinstance(node, nodes.SequenceNode) else [])
        if children_done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            height[key] = 1 + max((height[id(c)] for c in children), default=0)
            if size[key] > MAX_VALUES:
                raise _too_big(f"this value holds more than {MAX_VALUES:,} values once its aliases (`*name`) are "
                               "expanded, the most a recipe may hold", node, file,
                               "an alias repeats what its anchor names; one repeated inside another multiplies "
                               "(a \"billion laughs\" document): write the values out, or use `extends:`")
            if height[key] > MAX_DEPTH:
                raise _too_big(f"values nest more than {MAX_DEPTH} deep here (aliases expanded), the most a recipe "
                               "may", node, file, _TOO_DEEP_HINT)
            continue
        if key in size:
            continue
        if key in open_:
            raise _too_big("an alias refers to the collection that holds it: it would expand without end", node,
                           file, "point the alias at an anchor outside this collection")
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _mark(node: nodes.Node, file: str) -> Location:
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _to_node(node: nodes.Node, constructor: SafeConstructor, file: str, loc: Location, depth: int) -> Node:
    if depth > MAX_DEPTH:
        raise _too_big(f"values nest more than {MAX_DEPTH} deep here, the most a recipe may", node, file,
                       _TOO_DEEP_HINT)
    if isinstance(node, nodes.MappingNode):
        written: dict[str, Location] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = str(constructor.construct_object(key_node, deep=True))
            if key in written:
                raise RecipeError([Problem(f"duplicate key {key!r} (first written at line "
                                           f"{written[key].line}); keep one of them",
                                           location=_mark(key_node, file))])
            written[key] = _mark(key_node, file)
        # `<<:` merge keys: the merged pairs come first, so the mapping's own keys override them.
        constructor.flatten_mapping(node)
        children: dict[str, Node] = {}
        key_locs: dict[str, Location] = {}
        for key_node, value_node in node.value:
            key = str(constructor.construct_object(key_node, deep=True))
            key_locs[key] = _mark(key_node, file)
            children[key] = _to_node(value_node, constructor, file, _mark(value_node, file), depth + 1)
        return Node(children, loc, key_locs)
    if isinstance(node, nodes.SequenceNode):
        return Node([_to_node(item, constructor, file, _mark(item, file), depth + 1) for item in node.value], loc)
    return Node(constructor.construct_object(node, deep=True), loc)


def to_plain(node: Node) -> tuple[Any, dict[KeyPath, Location]]:
    """Plain data (dict/list/scalars, strings as SourcedStr) and the Location of every key path."""
    locs: dict[KeyPath, Location] = {}
    folders: dict[str, Path] = {}  # each file's folder, made once (a recipe has tens of thousands of strings)

    def walk(n: Node, path: KeyPath) -> Any:
        locs[path] = n.loc
        if isinstance(n.value, dict):
            out = {}
            for key, child in n.value.items():
                out[key] = walk(child, (*path, key))
                if key in n.key_locs:
                    locs[(*path, key, "<key>")] = n.key_locs[key]
            return out
        if isinstance(n.value, list):
            return [walk(child, (*path, i)) for i, child in enumerate(n.value)]
        if isinstance(n.value, str):
            folder = folders.get(n.loc.file)
            if folder is None:
                folder = folders[n.loc.file] = Path(n.loc.file).parent
            return SourcedStr(n.value, folder)
        return n.value

    return walk(node, ()), locs
