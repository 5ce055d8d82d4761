"""NearSwap, model-centric (mergekit's ``nearswap``): take the other model's value where it is close to the base's.

For base a and model b: w = clamp(t / max(|a − b|, 1e-6), 0, 1); out = w·b + (1 − w)·a — entries that differ by at
most t become b, larger differences move towards b by t/|a − b|. ``t`` (global) is required. In float32.
"""

from __future__ import annotations

import torch

from capmerge.merge.methods.models import ModelMethod, TensorInputs


def _nearswap(x: TensorInputs) -> torch.Tensor:
    if x.base is None or len(x.models) != 1:
        raise ValueError(f"tensor {x.name}: nearswap takes a base model and exactly one other model")
    a, b = x.base.float(), x.models[0].float()
    w = (float(x.params["t"]) / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)  # type: ignore[arg-type]
    return w * b + (1 - w) * a


MODEL_METHODS = (
    ModelMethod("nearswap", _nearswap, base="required", params={"t": None}, n_models=(1, 1),
                summary="the other model's value where it is within t of the base's, interpolated beyond"),
)  # fmt: skip
