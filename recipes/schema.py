"""The recipe schema: the keys each op takes and of what kind, and the data a validated recipe is made of
(:class:`Recipe`, :class:`Step`), with the content key of a step. Imported by the checker and the runner."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capmerge.errors import CapmergeError

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
    "merge": {  # models merged by a model-centric method (capmerge.merge_models, as `capmerge merge`)
        "models": (INPUTS, "strs", True),
        "base": (INPUT, "str", False),
        "output": (OUTPUT, "str", False),
        "method": (OPTION, "model_method", False),
        "parameters": (OPTION, "params", False),
        "dtype": (OPTION, "enum", False),
        "tokenizer_source": (OPTION, "str", False),
        "chat_template": (OPTION, "str", False),
        "seed": (OPTION, "int", False),
        "shard_size": (OPTION, "size", False),
        "allow_nonfinite": (OPTION, "bool", False),
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
