"""Model-centric merge methods: what mergekit calls a merge method, one tensor at a time.

A :class:`ModelMethod` merges the same tensor of N models (optionally relative to a base model) into one tensor.
Its ``fn`` receives a :class:`TensorInputs` (float32 tensors of one shape, the per-model and global parameters
already resolved for this tensor: filters and layer gradients applied, defaults filled in) and returns the merged
float32 tensor. Where the method has a block form (``form``, :mod:`~capmerge.merge.methods.blockform`), ``fn`` runs it
on whole tensors and the streaming runner (``capmerge merge``, mergekit configurations through ``capmerge run``) runs
the same form block by block; elsewhere both call ``fn``'s float32 torch code: one implementation per method.

``models`` are mergekit's non-base inputs, in the configuration's order (the base model is never among them, even when
a configuration also lists it under ``models``); ``model_params[i]`` belongs to ``models[i]``, and the index ``i`` keys
the random masks of the random methods (:func:`~capmerge.merge.methods.base.tensor_key`).

Family modules (one per method family: ``gta``, ``slerp``, ``karcher``, ``model_stock``, ``sce``, ``nearswap``,
``arcee_fusion``, ``passthrough``) list theirs in ``MODEL_METHODS``; :mod:`~capmerge.merge.methods.registry` collects
them by name. This module imports no torch (the registry and the CLI's start-up read it); the families do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorInputs:
    """One tensor's inputs: ``models[i]`` with ``model_params[i]``; ``base`` is None when the method has no base."""

    name: str
    models: list[torch.Tensor]
    model_params: list[Mapping[str, object]]
    params: Mapping[str, object]
    base: torch.Tensor | None = None
    seed: int = 0


@dataclass(frozen=True)
class ModelMethod:
    """A named model-centric method.

    ``base``: "required", "optional" or "unused". ``model_params`` / ``params``: the per-model and global parameters it
    reads, with their defaults (``None``: required). ``random``: its output depends on ``seed`` (masks keyed by
    :func:`~capmerge.merge.methods.base.tensor_key`). ``n_models``: the least and most number of (non-base) models it
    takes (``None``: no upper bound), as mergekit checks them. ``check(params, model_params)``: what is wrong with a
    tensor's resolved parameters, as (the model at fault, or None for the set of them; why), or None; the planner
    asks it of every tensor before anything is read.
    """

    name: str
    fn: Callable[[TensorInputs], torch.Tensor]
    base: str = "optional"
    model_params: Mapping[str, object] = field(default_factory=dict)
    params: Mapping[str, object] = field(default_factory=dict)
    random: bool = False
    summary: str = ""
    n_models: tuple[int, int | None] = (1, None)
    form: Callable[[Any], Any] | None = None  # Spec -> finish | None: the block form (methods/blockform.py)
    check: Callable[[Mapping[str, object], Sequence[Mapping[str, object]]], tuple[int | None, str] | None] | None = None

    def check_count(self, n: int, where: str | None = None, what: str = "") -> None:
        """A :class:`~capmerge.errors.UsageError` (at ``where``, its message after ``what``) unless the method takes
        ``n`` models besides the base."""
        from capmerge.errors import UsageError

        lo, hi = self.n_models
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            noun = "model" if lo == hi == 1 else "models"
            besides = "" if self.base == "unused" else " besides the base"
            raise UsageError(f"{what}merge method {self.name} takes {want} {noun}{besides}, got {n}", where)

    def resolve(
        self, params: Mapping[str, object] | None, model_params: Sequence[Mapping[str, object] | None]
    ) -> tuple[dict[str, object], list[dict[str, object]]]:
        """The global and per-model parameters with the defaults filled in; an unknown or missing parameter, or a
        number of models the method does not take, is a :class:`~capmerge.errors.UsageError`."""
        from capmerge.errors import UsageError

        self.check_count(len(model_params))

        def fill(given: Mapping[str, object] | None, spec: Mapping[str, object], what: str) -> dict[str, object]:
            given = dict(given or {})
            unknown = sorted(set(given) - set(spec))
            if unknown:
                known = ", ".join(spec) or "none"
                raise UsageError(f"merge method {self.name}: unknown {what} {', '.join(unknown)} (known: {known})")
            for k, v in given.items():  # nan or inf: refused as the CLI and configurations refuse them
                values = v if isinstance(v, list | tuple) else [v]
                if any(isinstance(x, float) and not math.isfinite(x) for x in values):
                    raise UsageError(f"merge method {self.name}: {what} {k} must be a finite number, got {v!r}")
            missing = [k for k, v in spec.items() if v is None and given.get(k) is None]
            if missing:
                raise UsageError(f"merge method {self.name}: {what} {', '.join(missing)} is required")
            return {k: given[k] if given.get(k) is not None else v for k, v in spec.items()}

        per_model = [fill(mp, self.model_params, "model parameter") for mp in model_params]
        return fill(params, self.params, "parameter"), per_model


def weights_sum_to_zero(key: str) -> Callable[[Mapping[str, object], Sequence[Mapping[str, object]]], Any]:
    """A ``check``: the models' weights summing to 0 where the global setting ``key`` (true by default) divides by
    their sum."""

    def check(params: Mapping[str, object], model_params: Sequence[Mapping[str, object]]) -> Any:
        if params.get(key, True) and sum(float(p["weight"]) for p in model_params) == 0:  # type: ignore[arg-type]
            return (
                None,
                f"the weights sum to 0, and {key} divides by their sum (set {key} to false, or give other weights)",
            )
        return None

    return check


def _linear(x: TensorInputs) -> torch.Tensor:
    """Σ w_i·θ_i, divided by Σ w_i when ``normalize`` (mergekit's default for linear)."""
    weights = [float(p["weight"]) for p in x.model_params]  # type: ignore[arg-type]
    out = sum(w * m for w, m in zip(weights, x.models, strict=True))
    if x.params.get("normalize", True):
        total = sum(weights)
        if total == 0:
            raise ValueError(f"tensor {x.name}: the weights sum to 0, cannot normalize")
        out = out / total
    return out  # type: ignore[return-value]


def _linear_form(s: Any) -> Any:
    """Σ w_i·θ_i, the kernel dividing by Σ w_i (a sum ≤ 0 under ``normalize``: the float32 ``fn``)."""
    from capmerge.merge.methods import blockform as B

    weights = [float(p["weight"]) for p in s.model_params]
    normalize = bool(s.params.get("normalize", True))
    if normalize and sum(weights) <= 0:
        return None
    return lambda st: B.Combo([B.Term(i, w) for i, w in enumerate(weights)], normalize=normalize)


def _linear_fn(x: TensorInputs) -> torch.Tensor:
    """linear's ``fn``: its block form, else (weights summing to ≤ 0 under ``normalize``) the float32 code."""
    from capmerge.merge.methods.blockform import with_form  # lazily: this module imports no torch

    return with_form(_linear_form, _linear)(x)


MODEL_METHODS = (
    ModelMethod("linear", _linear_fn, base="unused", model_params={"weight": None},
                params={"normalize": True}, form=_linear_form, check=weights_sum_to_zero("normalize"),
                summary="weighted average of the models' weights (Σ w_i·θ_i / Σ w_i)"),
)  # fmt: skip
