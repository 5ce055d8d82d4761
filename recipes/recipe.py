"""YAML recipes: reproducible multi-step merges, validated with file:line errors before any data is read.

A recipe::

    # capmerge run capvector.yaml pretrained=P/ sft=S/ aux=A/
    description: The CapVector pipeline
    vars:                      # ${name} anywhere below; null = must be given (name=value on the command line)
      sft: null
      alpha: 0.5
    workdir: runs/work         # intermediate outputs (default: capmerge-work/<recipe name>)
    steps:
      capvector:               # a step's name names its output; later steps refer to it as ${steps.capvector}
        op: diff
        base: ${sft}
        aux: ${aux}
      merged:
        op: apply
        base: ${pretrained}
        vectors: [${steps.capvector}]
        alpha: ${alpha}
        output: out/merged     # without `output`, a step writes into the work directory

Steps run in dependency order. Each step has a content key: its options plus the identity of its inputs (a step's
key for step outputs; path, size and modification time of every file for checkpoints). A step whose key and outputs
are unchanged since its last run is skipped, so changing only the last step re-runs only that step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capmerge.errors import CapmergeError
from capmerge.recipes import yaml_lines as _yaml

PathLike = str | os.PathLike[str]
TOP_KEYS = ("description", "vars", "workdir", "steps")
INPUT, INPUTS, PAIR, OUTPUT, OPTION = "input", "inputs", "pair", "output", "option"
_ENUMS = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "sign": ("none", "total", "frequency"),
    "by": ("layer", "tensor", "module"),
}


def _methods() -> tuple[str, ...]:
    from capmerge.merge.methods import PRESETS

    return tuple(PRESETS)


# op -> key -> (kind, type, required)
SCHEMA: dict[str, dict[str, tuple[str, str, bool]]] = {
    "diff": {
        "base": (INPUT, "str", True),
        "aux": (INPUT, "str", True),
        "output": (OUTPUT, "str", False),
        "dtype": (OPTION, "enum", False),
        "include": (OPTION, "strs", False),
        "exclude": (OPTION, "strs", False),
        "allow_missing": (OPTION, "bool", False),
        "allow_nonfinite": (OPTION, "bool", False),
        "shard_size": (OPTION, "size", False),
        "force": (OPTION, "bool", False),
    },
    "apply": {
        "base": (INPUT, "str", True),
        "vectors": (INPUTS, "strs", False),
        "add": (INPUTS, "strs", False),
        "sub": (INPUTS, "strs", False),
        "output": (OUTPUT, "str", False),
        "alpha": (OPTION, "numbers", False),
        "dtype": (OPTION, "enum", False),
        "method": (OPTION, "method", False),
        "weights": (OPTION, "numbers", False),
        "density": (OPTION, "numbers", False),
        "gamma": (OPTION, "number", False),
        "sign": (OPTION, "enum", False),
        "normalize": (OPTION, "bool", False),
        "rescale": (OPTION, "bool", False),
        "seed": (OPTION, "int", False),
        "include": (OPTION, "strs", False),
        "exclude": (OPTION, "strs", False),
        "layers": (OPTION, "layers", False),
        "layer_pattern": (OPTION, "str", False),
        "alpha_gradient": (OPTION, "numbers", False),
        "overrides": (OPTION, "overrides", False),
        "allow_missing": (OPTION, "bool", False),
        "allow_nonfinite": (OPTION, "bool", False),
        "allow_model_as_vector": (OPTION, "bool", False),
        "force": (OPTION, "bool", False),
    },
    "inspect": {
        "paths": (INPUTS, "strs", False),
        "against": (INPUT, "str", False),
        "task": (PAIR, "strs", False),
        "capability": (PAIR, "strs", False),
        "by": (OPTION, "enum", False),
        "spectrum": (OPTION, "bool", False),
        "headers_only": (OPTION, "bool", False),
        "layer_pattern": (OPTION, "str", False),
        "json": (OUTPUT, "str", False),
        "plot": (OUTPUT, "str", False),
    },
    "compress": {
        "vector": (INPUT, "str", True),
        "output": (OUTPUT, "str", False),
        "rank": (OPTION, "int", False),
        "energy": (OPTION, "number", False),
        "density": (OPTION, "number", False),
        "bits": (OPTION, "int", False),
        "force": (OPTION, "bool", False),
    },
    "push": {
        "path": (INPUT, "str", True),
        "repo_id": (OPTION, "str", True),
        "private": (OPTION, "bool", False),
        "revision": (OPTION, "str", False),
        "commit_message": (OPTION, "str", False),
        "create_pr": (OPTION, "bool", False),
        "recommended_alpha": (OPTION, "number", False),
    },
}


class RecipeError(CapmergeError, ValueError):
    """Every problem found in a recipe, each with its file, line and key. ``str()`` is one line per problem."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors  # (what, where) pairs; where = "file:line: key"
        what, where = errors[0]
        super().__init__(what, where)

    def __str__(self) -> str:
        return "\nerror: ".join(f"{w} ({loc})" for w, loc in self.errors)


@dataclass(frozen=True)
class StepRef:
    """``${steps.NAME}``: the output(s) of another step."""

    step: str


@dataclass(frozen=True)
class Unset:
    """The value of an expression that uses a variable nobody set (only while validating without values)."""

    var: str


@dataclass
class Step:
    name: str
    op: str
    line: int
    options: dict[str, Any]
    lines: dict[str, int]
    deps: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    """A validated recipe: variables resolved, steps in run order."""

    path: str
    name: str
    description: str
    variables: dict[str, Any]
    workdir: str
    steps: list[Step]
    unset: list[str]

    def plan(self) -> list[dict[str, Any]]:
        """The resolved steps, in run order (what ``capmerge run --plan`` prints)."""
        return [{"step": s.name, "op": s.op, "after": s.deps, **{k: _plain(v) for k, v in s.options.items()}}
                for s in self.steps]  # fmt: skip


def _plain(v: Any) -> Any:
    if isinstance(v, StepRef):
        return f"${{steps.{v.step}}}"
    if isinstance(v, Unset):
        return f"${{{v.var}}}"
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


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


def _plain_yaml(v: Any) -> Any:
    if isinstance(v, list):
        return [_plain_yaml(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain_yaml(x) for k, x in v.items()}
    return v


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["alpha=0.6", "out=runs/a"]`` → ``{"alpha": 0.6, "out": "runs/a"}`` (values parsed as YAML scalars)."""
    from capmerge.errors import UsageError

    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            raise UsageError(f"invalid override {item!r} (expected name=value)")
        try:
            value = _plain_yaml(_yaml.load(text)) if text.strip() else ""  # the recipe's lines, not the text's
        except _yaml.RecipeYAMLError as e:  # e.g. an integer that does not fit in 64 bits
            raise UsageError(f"invalid override {name}=...: {e.what}") from None
        except yaml.YAMLError:
            value = text
        out[name] = text if value is None else value
    return out


def shipped() -> dict[str, Path]:
    """The recipes shipped with capmerge (``capmerge.recipes`` package data): name → path."""
    from importlib import resources

    root = resources.files("capmerge.recipes")
    return {p.name[: -len(".yaml")]: Path(str(p)) for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}  # fmt: skip


def shipped_path(name: str) -> Path:
    """The file of a shipped recipe (``capvector`` or ``capvector.yaml``)."""
    from capmerge.errors import UsageError

    ships = shipped()
    key = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if key not in ships:
        raise UsageError(f"no shipped recipe named {name!r} (shipped: {', '.join(ships)})")
    return ships[key]


def describe(path: Path) -> str:
    """A recipe's ``description:``."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ""
    return str(doc.get("description", "")) if isinstance(doc, dict) else ""


def find(ref: PathLike) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (``capvector`` / ``capvector.yaml``)."""
    from capmerge.errors import CheckpointNotFoundError

    p = Path(ref)
    if p.is_file():
        return p
    name = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    ships = shipped()
    if str(ref) in (name, f"{name}.yaml") and name in ships:
        return ships[name]
    known = ", ".join(ships)
    raise CheckpointNotFoundError(f"no such recipe file (shipped recipes: {known})", os.fspath(ref))


def load(path: PathLike, overrides: Mapping[str, Any] | None = None, *, require_values: bool = True) -> Recipe:
    """Read and validate a recipe (no tensor data is read; inputs are only checked to exist).

    Args:
        path: the recipe file, or a shipped recipe's name.
        overrides: variable values, replacing the defaults under ``vars:``.
        require_values: report variables without a value (``null`` default, no override) as errors. With False
            (``capmerge recipes validate``) values that depend on them are not checked.

    Raises:
        RecipeError: listing every problem with file, line and key.
    """
    from capmerge.recipes.check import check

    p = find(path)
    where = str(path) if Path(path).is_file() else str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([(f"cannot read recipe: {e}", where)]) from None
    try:
        doc = _yaml.load(text)
    except yaml.YAMLError as e:
        line = _yaml.error_line(e, text)
        what = _yaml.error_message(e)
        if "'{'" in what:
            what += ' (quote values holding ${...} inside [ ] or { }: ["${steps.x}"])'
        raise RecipeError([(what, f"{where}:{line or 1}")]) from None
    return check(doc, where, p.stem, dict(overrides or {}), require_values)


def step_key(op: str, options: dict[str, Any], input_ids: dict[str, Any]) -> str:
    """The content key of a step: sha256 over its op, options and the identity of its inputs."""
    from capmerge._version import __version__

    blob = json.dumps({"op": op, "options": _plain(options), "inputs": input_ids, "version": __version__},
                      sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


def file_identity(ref: str) -> Any:
    """What a checkpoint input's key depends on: every file's name, size and mtime (a hub id: its string)."""
    p = Path(ref)
    if not p.exists():
        return ref
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    out = []
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            out.append([os.path.relpath(os.path.join(root, f), p), st.st_size, st.st_mtime_ns])
    return [str(p.resolve()), out]


def run_recipe(
    path: PathLike,
    *,
    workdir: PathLike | None = None,
    plan: bool = False,
    rerun: bool = False,
    progress: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run a recipe (the library form of ``capmerge run RECIPE.yaml key=value ...``).

    Args:
        path: the recipe file, or a shipped recipe's name.
        workdir: where intermediate outputs go (default: the recipe's ``workdir:``, else ``capmerge-work/<name>``).
        plan: only validate and return the plan (what would run, what is cached); nothing is read or written.
        rerun: ignore cached step outputs.
        progress: called with (step name, status) as steps start and finish.
        **overrides: variable values (``alpha=0.6``).

    Returns:
        ``{"recipe", "workdir", "steps": [{"step", "op", "key", "status": "ran" | "cached" | "planned",
        "outputs": [...], "result": {...}}]}``.
    """
    from capmerge.recipes.run import execute

    recipe = load(path, overrides)
    if workdir is not None:
        recipe = dataclasses.replace(recipe, workdir=os.fspath(workdir))
    return execute(recipe, plan=plan, rerun=rerun, progress=progress)
