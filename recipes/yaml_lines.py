"""YAML with line numbers: mappings and lists remember the line of each key / item (for file:line errors)."""

from __future__ import annotations

from typing import Any

import yaml


class LineDict(dict):
    """A mapping that knows its own line and the line of each key (1-based)."""

    line: int = 0
    lines: dict[Any, int]


class LineList(list):
    """A list that knows its own line and the line of each item (1-based)."""

    line: int = 0
    lines: list[int]


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        self.key, self.line, self.first = key, line, first
        super().__init__(f"duplicate key {key!r} (first at line {first})")


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in out.lines:
            raise DuplicateKey(key, line, out.lines[key])
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def load(text: str) -> Any:
    """Parse YAML into plain values, :class:`LineDict` and :class:`LineList` (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def error_line(exc: yaml.YAMLError) -> int | None:
    """The 1-based line a YAML error points at, if it says."""
    if isinstance(exc, DuplicateKey):
        return exc.line
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return mark.line + 1 if mark is not None else None


def line_of(container: Any, key: Any) -> int:
    """The line of ``container[key]`` (its key for mappings), falling back to the container's own line."""
    if isinstance(container, LineDict):
        return container.lines.get(key, container.line)
    if isinstance(container, LineList) and isinstance(key, int) and 0 <= key < len(container.lines):
        return container.lines[key]
    return getattr(container, "line", 0)
