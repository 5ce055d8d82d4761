"""The registry of merge methods: every family module's ``METHODS``, by name.

This is what the CLI (``--method``), recipes, and :func:`capmerge.apply` / ``apply_to_state_dict`` read to know which
methods exist and which parameters they take. Adding a method: a ``Method`` in its family's module (or a new family
module listed in ``_FAMILIES``), and its block kernel mode if it needs a new one.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from capmerge.errors import UsageError
from capmerge.merge.methods import breadcrumbs, dare, linear, ties
from capmerge.merge.methods.base import PRUNES, SIGNS, MergeOptions, Method

if TYPE_CHECKING:
    from capmerge.merge.methods.models import ModelMethod

_FAMILIES = (linear, ties, dare, breadcrumbs)

METHODS: dict[str, Method] = {m.name: m for family in _FAMILIES for m in family.METHODS}
PRESETS: dict[str, dict[str, object]] = {name: m.preset() for name, m in METHODS.items()}
"""name → the options the method sets (kept for callers that read presets as mappings)."""


@functools.cache
def _model_methods() -> dict[str, ModelMethod]:
    """Every model-centric family's ``MODEL_METHODS``, imported on first use: the families import torch, which
    ``capmerge --help`` and this registry's other readers must not pay for."""
    from capmerge.merge.methods import arcee_fusion, gta, karcher, model_stock, models, nearswap, passthrough, sce
    from capmerge.merge.methods import slerp as slerp_family

    families = (models, gta, slerp_family, karcher, model_stock, sce, nearswap, arcee_fusion, passthrough)
    found: dict[str, ModelMethod] = {}
    for family in families:
        for m in family.MODEL_METHODS:
            if m.name in found:
                raise RuntimeError(f"model method {m.name!r} is defined twice")
            found[m.name] = m
    return found


def __getattr__(name: str) -> Any:
    if name == "MODEL_METHODS":  # lazily: see _MODEL_FAMILIES
        return _model_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_model_method(name: str) -> ModelMethod:
    """The model-centric method called ``name`` (mergekit's merge methods, by mergekit's names); an unknown name is a
    :class:`~capmerge.errors.UsageError`. ``MODEL_METHODS`` (this module's attribute) maps every name to its method.
    """
    methods = _model_methods()
    try:
        return methods[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r} (choose from {', '.join(methods)})") from None


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is a :class:`~capmerge.errors.UsageError` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r} (choose from {', '.join(METHODS)})") from None


def resolve(
    method: str | None = None,
    *,
    prune: str | None = None,
    density: float | tuple[float, ...] | list[float] | None = None,
    gamma: float | None = None,
    sign: str | None = None,
    normalize: bool | None = None,
    rescale: bool | None = None,
    seed: int | None = None,
    n_vectors: int | None = None,
) -> MergeOptions:
    """A preset (default ``task_arithmetic``) with the explicitly given options on top, validated."""
    name = method or "task_arithmetic"
    opts = replace(MergeOptions(method=name), **get(name).preset())  # type: ignore[arg-type]
    given = {"prune": prune, "gamma": gamma, "sign": sign, "normalize": normalize, "rescale": rescale, "seed": seed}
    opts = replace(opts, **{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]
    if density is not None:
        dens = (float(density),) if isinstance(density, int | float) else tuple(float(d) for d in density)
        opts = replace(opts, density=dens)
    if opts.prune not in PRUNES:
        raise UsageError(f"unknown prune mode {opts.prune!r} (choose from {', '.join(PRUNES)})")
    if opts.sign not in SIGNS:
        raise UsageError(f"unknown --sign {opts.sign!r} (choose from {', '.join(SIGNS)})")
    for d in opts.density:
        if not 0.0 < d <= 1.0:
            raise UsageError(f"--density must be in (0, 1], got {d:g}")
    if not 0.0 <= opts.gamma < 1.0:
        raise UsageError(f"--gamma must be in [0, 1), got {opts.gamma:g}")
    if n_vectors is not None and len(opts.density) not in (1, n_vectors):
        raise UsageError(f"--density has {len(opts.density)} values for {n_vectors} vectors")
    return opts
