"""SCE, model-centric (mergekit's ``sce``; Wan et al., 2024): Select (the entries where the task vectors disagree
most), Calculate (per-model weights from their energy), Erase (the entries against the elected sign).

τ_i = θ_i − θ₀. With ``select_topk`` = s < 1: the variance over models of each entry, v = Var_i(τ_i) (population);
keep the k = int(s·#{v ≠ 0}) entries of largest v in every τ_i (ties with the k-th kept), zero the rest (s ≤ 0 keeps
nothing). Weights c_i = mean(τ_i²) / Σ_j mean(τ_j²) (1/K each when that sum is below 1e-6). Signs are elected on Σ τ_i
(+ on a tie) and m_i = [sign(τ_i) = elected]; out = θ₀ + Σ c_i·m_i·τ_i / max(Σ c_i·m_i, 1e-6). ``int8_mask`` is
accepted and ignored (a memory saving in mergekit that cannot change a float32 result).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from capmerge import functional as F
from capmerge.functional import population_variance
from capmerge.merge import compute
from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import ModelMethod, TensorInputs

if TYPE_CHECKING:
    import torch


def select_mask(taus: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """1.0 at the int(s·#nonzero) entries of largest variance across the task vectors (ties kept), else 0.0."""
    import torch

    if select_topk <= 0:
        return torch.zeros_like(taus[0])
    if select_topk >= 1:
        return torch.ones_like(taus[0])
    var = population_variance(taus)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k == 0:
        return torch.zeros_like(var)
    from capmerge.merge.plan import kth_largest_abs_tensor

    return (var >= kth_largest_abs_tensor(var, [k])[k]).to(torch.float32)


def _sce(x: TensorInputs) -> torch.Tensor:
    import torch

    if x.base is None:
        raise ValueError(f"tensor {x.name}: sce needs a base model")
    base = x.base.float()
    if not x.models:
        return base.clone()
    taus = [m.float() - base for m in x.models]
    topk = float(x.params.get("select_topk", 1.0))  # type: ignore[arg-type]
    if topk < 1:
        mask = select_mask(taus, topk)
        taus = [torch.where(mask > 0, t, 0.0) for t in taus]  # dropped: 0, even where not finite
    energy = torch.stack([t.square().reshape(-1).mean() for t in taus])
    total = float(energy.sum())
    c = torch.full_like(energy, 1.0 / len(taus)) if abs(total) < 1e-6 else energy / total
    return base + F.combine(taus, [float(ci) for ci in c], sign="sum", floor=1e-6)


def _form(s: B.Spec) -> B.Finish | None:
    """The block form: a threshold pass over the variance (computed block by block, never stored) that also counts
    #{var ≠ 0}, whose share is the rank (:meth:`~capmerge.merge.methods.blockform.Stats.sce_selection`), a pass for
    the keep bits of var ≥ threshold and the energies; then the kernel's merge with the bits, the
    weights c_i, signs elected on the unweighted sum (``sum``) and the divisor floored at 1e-6. The energies are
    float64 sums (rounded once), where ``fn``'s fallback takes torch's float32 mean."""
    if not s.has_base:
        return None
    topk = float(s.params.get("select_topk", 1.0))

    def finish(st: B.Stats) -> B.Combo:
        k, n = s.n_models, s.numel
        if k == 0 or n == 0:
            return B.Combo([], with_base=True)
        bits = None
        if topk >= 1:
            _, sums, _ = st.sce(count=False)
        else:
            kk, thr = st.sce_selection(topk) if topk > 0 else (0, math.inf)
            if kk == 0:  # nothing selected: θ₀ (every term dropped)
                return B.Combo([B.Term(i, 1.0 / k, B.DROP_ALL) for i in range(k)], relative=True, with_base=True)
            _, sums, bits = st.sce(thr)
        energy = np.array([x / n for x in sums], dtype=np.float32)
        total = np.float32(energy.sum(dtype=np.float32))
        c = np.full(k, np.float32(1.0 / k)) if abs(float(total)) < 1e-6 else (energy / total).astype(np.float32)
        prune = (B.BITS, 0.0, 0.0, 0) if bits is not None else B.KEEP_ALL
        terms = [B.Term(i, float(c[i]), prune, bits) for i in range(k)]
        return B.Combo(terms, relative=True, with_base=True, sign="sum", normalize=compute.NORMALIZE_FLOOR)

    return finish


MODEL_METHODS = (
    ModelMethod("sce", B.with_form(_form, _sce), base="required", form=_form,
                params={"select_topk": 1.0, "int8_mask": False}, n_models=(0, None),
                summary="variance-based selection, energy weights, sign election (SCE)"),
)  # fmt: skip
