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

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
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
    """Parse one YAML file into a Node tree. Syntax errors become located RecipeErrors."""
    yaml = YAML(typ="rt")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError([Problem(f"cannot read file: {exc.strerror}", location=Location(str(path), 1, 1))]) from None
    try:
        data = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Location(str(path), mark.line + 1, mark.column + 1) if mark else Location(str(path), 1, 1)
        raise RecipeError([Problem(f"YAML syntax error: {exc.problem or exc.context}", location=loc)]) from None
    if data is None:
        data = CommentedMap()
    return _to_node(data, str(path), Location(str(path), 1, 1))


def _to_node(data: Any, file: str, loc: Location) -> Node:
    if isinstance(data, CommentedMap):
        children: dict[str, Node] = {}
        key_locs: dict[str, Location] = {}
        for key in data:
            kline, kcol = data.lc.key(key)
            vline, vcol = data.lc.value(key)
            key_locs[str(key)] = Location(file, kline + 1, kcol + 1)
            children[str(key)] = _to_node(data[key], file, Location(file, vline + 1, vcol + 1))
        return Node(children, loc, key_locs)
    if isinstance(data, CommentedSeq):
        items = []
        for i, item in enumerate(data):
            line, col = data.lc.item(i)
            items.append(_to_node(item, file, Location(file, line + 1, col + 1)))
        return Node(items, loc)
    # ruamel's scalar subclasses (ScalarFloat, ScalarBoolean, ...) become plain Python values.
    if isinstance(data, bool):
        return Node(bool(data), loc)
    if isinstance(data, int):
        return Node(int(data), loc)
    if isinstance(data, float):
        return Node(float(data), loc)
    if isinstance(data, str):
        return Node(str(data), loc)
    return Node(data, loc)


def to_plain(node: Node) -> tuple[Any, dict[KeyPath, Location]]:
    """Plain data (dict/list/scalars, strings as SourcedStr) and the Location of every key path."""
    locs: dict[KeyPath, Location] = {}

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
            return SourcedStr(n.value, Path(n.loc.file).parent)
        return n.value

    return walk(node, ()), locs
