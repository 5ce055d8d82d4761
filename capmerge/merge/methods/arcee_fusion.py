"""Arcee Fusion, model-centric (mergekit's ``arcee_fusion``): take the other model's changes only where they matter.

For base θ₀ and model θ₁: importance I = |θ₁ − θ₀|·KL, KL = Σ p·log(p/q) over the last dimension with
p = softmax(θ₁) + 1e-8, q = softmax(θ₀) + 1e-8 (a 1-D tensor is one row); with Q(x) the element of rank
⌊x·(n − 1)⌋ (0-based) of the sorted I, the threshold is Q(½) + 1.5·(Q(¾) − Q(¼)) and
out = θ₀ + (θ₁ − θ₀)·[I ≥ threshold].
In float32. The quantiles are exact for every size (a linear-time selection, no sort); mergekit estimates them from
a random sample of 10⁶ entries (with replacement) once a tensor has more, so for such tensors its threshold — and
output — varies from run to run.
"""

from __future__ import annotations

import torch

from capmerge.merge.methods.models import ModelMethod, TensorInputs


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ₀| times the row's KL divergence between the softmaxes of θ₁ and θ₀ (see the module's docstring)."""
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    return (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def ranked(flat: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """The elements of 0-based ranks ``ranks`` of ``flat`` sorted ascending (float32, exact): from the native
    histogram selection when every entry is ≥ 0 (then |x| orders as x), else torch.kthvalue; no sort either way."""
    n = flat.numel()
    if n and bool(flat.min() >= 0):
        from capmerge.merge.plan import kth_largest_abs_tensor

        got = kth_largest_abs_tensor(flat, [n - r for r in ranks])
        return torch.tensor([got[n - r] for r in ranks], dtype=torch.float32)
    return torch.stack([torch.kthvalue(flat, r + 1).values for r in ranks])


def _arcee_fusion(x: TensorInputs) -> torch.Tensor:
    if x.base is None or len(x.models) != 1:
        raise ValueError(f"tensor {x.name}: arcee_fusion takes a base model and exactly one other model")
    base, model = x.base.float(), x.models[0].float()
    scores = importance(model, base)
    if scores.numel() == 0:
        return base
    q1, median, q3 = ranked(scores.reshape(-1), [int(q * (scores.numel() - 1)) for q in (0.25, 0.5, 0.75)])
    mask = (scores >= median + 1.5 * (q3 - q1)).to(torch.float32)
    return base + (model - base) * mask


MODEL_METHODS = (
    ModelMethod("arcee_fusion", _arcee_fusion, base="required", n_models=(1, 1),
                summary="the other model's changes where their importance (change × KL) is an upper outlier"),
)  # fmt: skip
