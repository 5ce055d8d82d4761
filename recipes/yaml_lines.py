"""YAML with line numbers: mappings and lists remember the line of each key / item (for file:line errors).

Also bounded, so that a small hostile file fails fast with a line number instead of exhausting memory or the stack:
nesting deeper than :data:`MAX_DEPTH`, aliases expanding to more than :data:`MAX_NODES` values (a 600-byte
"billion laughs" document expands to 387 million), integers that do not fit in 64 bits, and mapping keys that are
lists or mappings are refused while the document is read.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_DEPTH = 64
"""Deepest nesting of lists and mappings (a recipe needs about 6)."""
MAX_NODES = 100_000
"""Most values a document may hold once its aliases are expanded (a recipe holds a few hundred)."""
_MAX_INT_CHARS = 80  # no 64-bit integer is written longer, in any base; int() raises past 4300 decimal digits


class LineDict(dict):
    """A mapping that knows its own line and the line of each key (1-based)."""

    line: int = 0
    lines: dict[Any, int]


class LineList(list):
    """A list that knows its own line and the line of each item (1-based)."""

    line: int = 0
    lines: list[int]


class RecipeYAMLError(yaml.YAMLError):
    """A YAML document refused while reading it: ``what`` is the message, ``line`` the 1-based line."""

    def __init__(self, what: str, line: int) -> None:
        self.what, self.line = what, line
        super().__init__(what)


class DuplicateKey(RecipeYAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        self.key, self.first = key, first
        super().__init__(f"invalid YAML: duplicate key {key!r} (first at line {first})", line)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Loader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> number of values under it, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self._depth >= MAX_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise RecipeYAMLError(f"YAML nested more than {MAX_DEPTH} levels deep", line)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._sizes.get(id(node))
        if size is None:  # a node just composed (an alias returns its anchor's node, already counted)
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes.get(id(c), 1) for c in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        if size > MAX_NODES:
            raise RecipeYAMLError(
                f"YAML aliases expand to more than {MAX_NODES} values (an alias bomb?); write the values out",
                _line(node),
            )
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, IndexError) as e:
            # e.g. `2020-13-45` (a date with month 13), `!!int abc`, `!!bool maybe`
            tag = node.tag.rsplit(":", 1)[-1]
            value = node.value if isinstance(node.value, str) else ""
            shown = repr(value) if len(value) <= 40 else f"{value[:40]!r}…"
            why = " ".join(str(e).split()) or type(e).__name__
            raise RecipeYAMLError(f"cannot read the value {shown} as {tag}: {why}", _line(node)) from None


def _mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    """A mapping with its keys' lines. Merge keys (``<<: *anchor``) are flattened as PyYAML does — the merged pairs
    first, so a key written in the mapping overrides a merged one —; a key written twice is an error."""
    written = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    merged = len(node.value) - written  # flatten_mapping puts the merged pairs before the written ones
    out = LineDict()
    out.line = _line(node)
    out.lines = {}
    seen: set[Any] = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        line = _line(key_node)
        try:
            hash(key)
        except TypeError:
            kind = "list" if isinstance(key, list) else "mapping" if isinstance(key, dict) else type(key).__name__
            raise RecipeYAMLError(f"a mapping key must be a plain value such as a name, not a {kind}", line) from None
        if i >= merged:
            if key in seen:
                raise DuplicateKey(key, line, out.lines[key])
            seen.add(key)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = _line(node)
    out.lines = [_line(child) for child in node.value]
    return out


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = str(node.value)
    if len(text) <= _MAX_INT_CHARS:
        value = yaml.SafeLoader.construct_yaml_int(loader, node)
        if -(2**63) <= value < 2**64:
            return value
    shown = text if len(text) <= 30 else f"{text[:30]}…({len(text)} characters)"
    raise RecipeYAMLError(f"integer {shown} does not fit in 64 bits", _line(node))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)
_Loader.add_constructor("tag:yaml.org,2002:int", _int)
# YAML 1.1 (PyYAML) reads `1e-7` (an exponent without a dot) as a string; YAML 1.2, mergekit (pydantic) and every
# configuration writer mean a number
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load(text: str) -> Any:
    """Parse YAML into plain values, :class:`LineDict` and :class:`LineList` (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def plain(v: Any) -> Any:
    """``v`` as plain lists and dicts (the line-keeping containers of :func:`load` copied into built-in ones)."""
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


def error_line(exc: yaml.YAMLError, text: str = "") -> int | None:
    """The 1-based line a YAML error points at, if it says (``text``: the document, for errors giving a position)."""
    if isinstance(exc, RecipeYAMLError):
        return exc.line
    if isinstance(exc, yaml.reader.ReaderError):
        return text.count("\n", 0, exc.position) + 1
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return mark.line + 1 if mark is not None else None


def error_message(exc: yaml.YAMLError) -> str:
    """One line saying what is wrong with a YAML document."""
    if isinstance(exc, RecipeYAMLError):
        return exc.what
    if isinstance(exc, yaml.reader.ReaderError):
        ch = exc.character
        code = ch if isinstance(ch, int) else ord(ch)
        if exc.encoding != "unicode":  # bytes that do not decode
            return f"invalid YAML: byte {code:#04x} is not valid {exc.encoding}"
        return f"invalid YAML: control character #x{code:04x} is not allowed (a NUL byte or similar)"
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"invalid YAML: {what}"


def line_of(container: Any, key: Any) -> int:
    """The line of ``container[key]`` (its key for mappings), falling back to the container's own line."""
    if isinstance(container, LineDict):
        return container.lines.get(key, container.line)
    if isinstance(container, LineList) and isinstance(key, int) and 0 <= key < len(container.lines):
        return container.lines[key]
    return getattr(container, "line", 0)
