"""``${var}`` and ``${steps.NAME}`` expansion with its limits (size, nesting): the context the checker fills."""

from __future__ import annotations

import re
from typing import Any

from capmerge.recipes import yaml_lines as _yaml
from capmerge.recipes.schema import RecipeError, StepRef, Unset

_VAR = re.compile(r"\$\$|\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


MAX_EXPANDED = 1_000_000
"""Largest value a ``${...}`` expansion may build: characters of a string; a list or mapping counts its items'
sizes (a variable used twice counts twice). Recipes hold paths and numbers: a few hundred characters."""
MAX_NESTING = 64
"""Deepest nesting of a value once variables are expanded (variables referring to variables count as levels)."""


class _TooLarge(Exception):
    pass


class _Ctx:
    """Collects errors and resolves ``${...}`` against the variables (bounded by MAX_EXPANDED and MAX_NESTING)."""

    def __init__(self, path: str, defaults: dict[str, Any], lines: dict[str, int], overrides: dict[str, Any]):
        self.path = path
        self.errors: list[tuple[str, str]] = []
        self.raw = {**defaults, **overrides}
        self.lines = lines
        self.values: dict[str, Any] = {}
        self.resolving: list[str] = []
        self.unset: set[str] = set()
        self.depth = 0
        self._sizes: dict[int, tuple[Any, int]] = {}  # id(container built here) -> (container, expanded size)

    def err(self, what: str, line: int, key: str) -> None:
        self.errors.append((what, f"{self.path}:{line}: {key}"))

    def size(self, value: Any) -> int:
        """The expanded size of a value :meth:`subst` returned (shared sub-values count each time they appear)."""
        if isinstance(value, str):
            return len(value)
        known = self._sizes.get(id(value))
        return known[1] if known is not None and known[0] is value else 1

    def refuse(self, what: str, line: int, key: str) -> RecipeError:
        """An error that stops validation at once (what follows would only repeat it, or be as large)."""
        self.err(what, line, key)
        return RecipeError(self.errors)

    def _built(self, container: Any, size: int, line: int, key: str) -> Any:
        if size > MAX_EXPANDED:
            what = f"value expands to more than {MAX_EXPANDED} characters (variables used inside each other?)"
            raise self.refuse(what, line, key)
        self._sizes[id(container)] = (container, size)
        return container

    def var(self, name: str, line: int, key: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name not in self.raw:
            self.err(f"undefined variable ${{{name}}} (define it under vars:)", line, key)
            return Unset(name)
        if name in self.resolving:
            chain = " -> ".join([*self.resolving[self.resolving.index(name) :], name])
            self.err(f"variables refer to each other in a cycle ({chain})", self.lines.get(name, line), f"vars.{name}")
            return Unset(name)
        raw = self.raw[name]
        if raw is None:
            self.unset.add(name)
            return Unset(name)
        self.resolving.append(name)
        try:
            value = self.subst(raw, self.lines.get(name, line), f"vars.{name}")
        finally:
            self.resolving.pop()
        self.values[name] = value
        return value

    def subst(self, value: Any, line: int, key: str) -> Any:
        if self.depth >= MAX_NESTING:
            what = f"value nests more than {MAX_NESTING} levels deep (counting variables used in variables)"
            raise self.refuse(what, line, key)
        self.depth += 1
        try:
            return self._subst(value, line, key)
        finally:
            self.depth -= 1

    def _subst(self, value: Any, line: int, key: str) -> Any:
        if isinstance(value, str):
            m = _VAR.fullmatch(value)
            if m and m.group(1) is not None:
                return self._lookup(m.group(1).strip(), line, key)
            unset: list[Unset] = []
            total = [len(value)]

            def fill(m: re.Match[str]) -> str:
                if m.group(0) == "$$":
                    return "$"
                v = self._lookup(m.group(1).strip(), line, key)
                if isinstance(v, StepRef):
                    self.err(f"${{steps.{v.step}}} must be the whole value, not part of a string", line, key)
                    return ""
                if isinstance(v, Unset):
                    unset.append(v)
                    return ""
                total[0] += self.size(v)
                if total[0] > MAX_EXPANDED:  # stop before building it
                    raise _TooLarge
                return _fmt(v)

            try:
                out = _VAR.sub(fill, value)
            except _TooLarge:
                return self._built(value, total[0], line, key)
            return unset[0] if unset else out
        if isinstance(value, _yaml.LineDict):
            d = _yaml.LineDict()
            d.line, d.lines = value.line, value.lines
            size = 1
            for k, v in value.items():
                d[k] = self.subst(v, value.lines.get(k, line), f"{key}.{k}")
                size += 1 + self.size(d[k])
            return self._built(d, size, line, key)
        if isinstance(value, list):
            lines = getattr(value, "lines", [line] * len(value))
            out_l = _yaml.LineList(self.subst(v, lines[i], f"{key}[{i}]") for i, v in enumerate(value))
            out_l.line, out_l.lines = getattr(value, "line", line), lines
            return self._built(out_l, 1 + sum(self.size(v) for v in out_l), line, key)
        return value

    def _lookup(self, expr: str, line: int, key: str) -> Any:
        if expr.startswith("steps."):
            name = expr[len("steps.") :]
            if not _NAME.fullmatch(name):
                self.err(f"invalid step reference ${{{expr}}}", line, key)
                return Unset(expr)
            return StepRef(name)
        if not _NAME.fullmatch(expr):
            self.err(f"invalid variable reference ${{{expr}}}", line, key)
            return Unset(expr)
        return self.var(expr, line, key)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        from capmerge.merge.masks import format_number

        return format_number(v)
    if isinstance(v, list):
        return ",".join(_fmt(x) for x in v)
    return str(v)
