"""Model Stock, model-centric (mergekit's ``model_stock``; Jang et al., 2024): interpolate between the base θ₀ and the
average of K ≥ 2 finetunes by a ratio from the angle between their task vectors.

τ_i = θ_i − θ₀ (the flattened tensor, or with ``filter_wise`` each vector along the last dimension — a 1-D tensor is
one vector either way); cos φ = the mean over pairs i < j of τ_i·τ_j / max(‖τ_i‖·‖τ_j‖, 1e-6), clamped to [−1, 1];
t = K·cos φ / (1 + (K − 1)·cos φ), or 0 (the base) where |1 + (K − 1)·cos φ| < 1e-6;
out = t·(Σ θ_i / K) + (1 − t)·θ₀. In float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import ModelMethod, TensorInputs

if TYPE_CHECKING:
    import torch


def _model_stock(x: TensorInputs) -> torch.Tensor:
    import torch

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


def _form(s: B.Spec) -> B.Finish | None:
    """out = θ₀ + (t/K)·Σ τ_i with cos φ from the Gram matrix of the task vectors (float64); ``filter_wise`` on a
    tensor of more than one dimension (one ratio per row) uses the float32 ``fn``."""
    k = s.n_models
    if not s.has_base or k < 2 or (s.params.get("filter_wise") and len(s.shape) > 1):
        return None

    def finish(st: B.Stats) -> B.Combo:
        m = st.moments(relative=True)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        cos = sum(min(1.0, max(-1.0, m.gram[i][j] / max(m.norm(i) * m.norm(j), 1e-6))) for i, j in pairs) / len(pairs)
        den = 1 + (k - 1) * cos
        t = 0.0 if abs(den) < 1e-6 else k * cos / den
        return B.Combo([B.Term(i, t / k) for i in range(k)], relative=True, with_base=True)

    return finish


MODEL_METHODS = (
    ModelMethod("model_stock", B.with_form(_form, _model_stock), base="required", params={"filter_wise": False},
                n_models=(2, None), form=_form,
                summary="base-to-average interpolation with a ratio from the angle between the task vectors"),
)  # fmt: skip
