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
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from capmerge.recipes import yaml_lines as _yaml
from capmerge.recipes.expand import _NAME
from capmerge.recipes.schema import PathLike, Recipe, RecipeError


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
            value = _yaml.plain(_yaml.load(text)) if text.strip() else ""  # the recipe's lines, not the text's
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
    raise CheckpointNotFoundError(f"no such file, nor a shipped recipe ({known})", os.fspath(ref))


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
