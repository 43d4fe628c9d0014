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

from ruamel.yaml import YAML, nodes
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
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError([Problem(f"cannot read file: {exc.strerror}", location=Location(str(path), 1, 1))]) from None
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


def _compose(text: str, path: Path, pure: bool) -> Node:
    yaml = YAML(typ="safe", pure=pure)
    root = yaml.compose(text)
    if root is None:
        return Node({}, Location(str(path), 1, 1))
    return _to_node(root, yaml.constructor, str(path), Location(str(path), 1, 1))


def _mark(node: nodes.Node, file: str) -> Location:
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _to_node(node: nodes.Node, constructor: SafeConstructor, file: str, loc: Location) -> Node:
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
            children[key] = _to_node(value_node, constructor, file, _mark(value_node, file))
        return Node(children, loc, key_locs)
    if isinstance(node, nodes.SequenceNode):
        return Node([_to_node(item, constructor, file, _mark(item, file)) for item in node.value], loc)
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
