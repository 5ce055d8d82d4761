"""NearSwap, model-centric (mergekit's ``nearswap``): take the other model's value where it is close to the base's.

For base a and model b: w = clamp(t / max(|a − b|, 1e-6), 0, 1); out = w·b + (1 − w)·a — entries that differ by at
most t become b, larger differences move towards b by t/|a − b|. ``t`` (global) is required. In float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import ModelMethod, TensorInputs

if TYPE_CHECKING:
    import torch


def _nearswap(x: TensorInputs) -> torch.Tensor:
    if x.base is None or len(x.models) != 1:
        raise ValueError(f"tensor {x.name}: nearswap takes a base model and exactly one other model")
    a, b = x.base.float(), x.models[0].float()
    w = (float(x.params["t"]) / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)  # type: ignore[arg-type]
    return w * b + (1 - w) * a


def _form(s: B.Spec) -> B.Finish | None:
    """θ₀ + w·(θ₁ − θ₀), w = clamp(t / max(|θ₁ − θ₀|, 1e-6), 0, 1): one kernel pass (mode NEAR), no statistics.
    mergekit computes w·θ₁ + (1 − w)·θ₀; the two differ by float32 rounding (a few ulps)."""
    if not s.has_base or s.n_models != 1:
        return None
    t = float(s.params["t"])
    return lambda st: B.Combo([B.Term(0, 1.0, (B.NEAR, t, 0.0, 0))], relative=True, with_base=True)


MODEL_METHODS = (
    ModelMethod("nearswap", B.with_form(_form, _nearswap), base="required", params={"t": None}, n_models=(1, 1),
                form=_form,
                summary="the other model's value where it is within t of the base's, interpolated beyond"),
)  # fmt: skip
