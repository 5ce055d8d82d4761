"""Model Stock, model-centric (mergekit's ``model_stock``; Jang et al., 2024): interpolate between the base θ₀ and the
average of K ≥ 2 finetunes by a ratio from the angle between their task vectors.

τ_i = θ_i − θ₀ (the flattened tensor, or with ``filter_wise`` each vector along the last dimension — a 1-D tensor is
one vector either way); cos φ = the mean over pairs i < j of τ_i·τ_j / max(‖τ_i‖·‖τ_j‖, 1e-6), clamped to [−1, 1];
t = K·cos φ / (1 + (K − 1)·cos φ), or 0 (the base) where |1 + (K − 1)·cos φ| < 1e-6;
out = t·(Σ θ_i / K) + (1 − t)·θ₀. In float32.
"""

from __future__ import annotations

import torch

from capmerge.merge.methods.models import ModelMethod, TensorInputs


def _model_stock(x: TensorInputs) -> torch.Tensor:
    if x.base is None or len(x.models) < 2:
        raise ValueError(f"tensor {x.name}: model_stock takes a base model and at least two other models")
    shape = x.base.shape
    w0, ws = x.base.float(), [m.float() for m in x.models]
    if x.params.get("filter_wise"):
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    den = 1 + (k - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / torch.where(singular, torch.ones_like(den), den))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


MODEL_METHODS = (
    ModelMethod("model_stock", _model_stock, base="required", params={"filter_wise": False}, n_models=(2, None),
                summary="base-to-average interpolation with a ratio from the angle between the task vectors"),
)  # fmt: skip
