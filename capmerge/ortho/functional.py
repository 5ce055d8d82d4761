"""The penalty as a plain differentiable function of materialised updates Δ (no module, no state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from capmerge.errors import MismatchError, UsageError

__all__ = ["orthogonality_penalty"]


def orthogonality_penalty(
    deltas: Mapping[str, torch.Tensor],
    vectors: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    *,
    mode: str = "cosine2",
    reduction: str = "mean",
    eps: float = 1e-3,
    basis: str = "sum",
    references: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """mean_l (or Σ_l) penalty(Δ_l, τ_l) over the names of ``deltas`` present in the vectors, in float32 (float64
    for float64).

    The same definitions as :class:`capmerge.ortho.OrthogonalityLoss` (see there), for callers that already hold Δ
    — e.g. a custom adapter type — or want the math spelled out. Costs a float32 copy per tensor.

    Args:
        deltas: name → Δ (any dtype; gradients flow through).
        vectors: One mapping name → τ, or a list of them.
        mode, reduction, eps, basis: As for the loss.
        references: name → θ_ref,l, for ``cosine2``'s ε_l = eps·‖θ_ref,l‖ (as the loss takes it); without them
            ε_l = eps, an absolute ε.

    Raises:
        MismatchError: A shape mismatch or no common name. UsageError: Unknown options.
    """
    if mode not in ("cosine2", "projection2", "abs") or reduction not in ("sum", "mean"):
        raise UsageError(f"unknown mode {mode!r} or reduction {reduction!r}")
    if basis not in ("sum", "orthonormal"):
        raise UsageError(f"unknown basis {basis!r}")
    vecs = [vectors] if isinstance(vectors, Mapping) else list(vectors)
    terms = []
    for name, delta in deltas.items():
        taus = [v[name] for v in vecs if name in v]
        if not taus:
            continue
        acc = torch.float64 if delta.dtype == torch.float64 else torch.float32
        d = delta.reshape(-1).to(acc)
        units = []
        for tau in taus:
            if tuple(tau.shape) != tuple(delta.shape):
                raise MismatchError(f"shape {list(tau.shape)} vs {list(delta.shape)}", name)
            t = tau.detach().reshape(-1).to(torch.float64)
            if basis == "orthonormal":
                for _ in range(2):
                    for q in units:
                        t = t - torch.dot(t, q) * q
            norm = torch.linalg.vector_norm(t)
            if norm > (1e-5 * torch.linalg.vector_norm(tau.double()) if basis == "orthonormal" else 0):
                units.append(t / norm)
        if not units:
            continue
        p = torch.stack([torch.dot(d, u.to(acc)) for u in units])
        if mode == "cosine2":
            scale = 1.0 if references is None else float(torch.linalg.vector_norm(references[name].detach().double()))
            terms.append((p * p).sum() / (torch.dot(d, d) + (eps * scale) ** 2 + 1e-24))
        elif mode == "projection2":
            terms.append((p * p).sum())
        elif basis == "orthonormal":
            s = (p * p).sum()
            terms.append(torch.sqrt(s) if bool(s > 0) else s * 0)
        else:
            terms.append(p.abs().sum())
    if not terms:
        raise MismatchError("no tensor of the update has a (non-zero) vector tensor")
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total
