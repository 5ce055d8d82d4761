"""Per-step statistics: ⟨Δ_l, τ̂_lk⟩ and ‖Δ_l‖² for every tracked tensor, in float32, one collective per call.

Every tracked tensor contributes *partial sums* over its local data (the whole tensor, or its shard under FSDP2):

* a dense parameter θ with stored directions U (K × n, rows scaled to max |u| = 1, ``inv_k`` = 1/‖u_k‖):
  P_k = ⟨θ − θ_ref, u_k⟩ (reference copy kept) or ⟨θ, u_k⟩ (projection modes, with c_k = ⟨θ_ref, û_k⟩
  subtracted later), and N = ‖θ − θ_ref‖² — computed by :class:`_DenseStats`, one fused pass per tensor without
  autograd bookkeeping; its backward writes Σ_k g_k·u_k + 2·g_N·(θ − θ_ref) straight into one gradient buffer;
* a LoRA layer Δ = Σ_a s_a·B_a·A_a = B·A (B = [s_a·B_a], A = [A_a] concatenated over adapters):
  M_k = Bᵀ·u_k (R × in), G = BᵀB (R × R) and A, so that ⟨Δ, u_k⟩ = Σ(M_k ⊙ A) and ‖Δ‖² = Σ(G ⊙ A·Aᵀ) — B·A is
  never formed; autograd differentiates these small matrix products.

Partial sums of tensors sharded over the same process groups are packed into one buffer and all-reduced once;
the scalars are then formed from the sums, identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from capmerge.errors import UsageError
from capmerge.ortho._dist import ReduceKey, all_reduce_sum, is_dtensor, local, row_offset
from capmerge.ortho._targets import LoraFactors

__all__ = ["Target", "dot_acc", "group_stats", "mv_acc", "safe_sqrt"]

# Low-precision tensors are widened to the accumulation dtype this many elements at a time.
_CHUNK = 1 << 20
# CPU temporaries (θ − θ_ref) are made this many elements at a time: a full-size one costs more in page faults
# than the arithmetic, a small one more in per-op overhead (measured on MiniLM: 2^20 is the sweet spot).
_CPU_CHUNK = 1 << 20


@dataclass
class Target:
    """One tracked tensor: its parameter (or LoRA layer), stored directions and bookkeeping for reports."""

    name: str
    layer: int | None
    u: str  # buffer name of the directions: (K, n_local) dense, (K, out_local, in) LoRA
    k: int
    tau_norm: list[float]  # ‖τ_k‖ of the vector each direction comes from (0.0 for basis directions)
    vec_index: list[int]  # index of that vector (−1 for basis directions)
    key: ReduceKey
    param: torch.Tensor | None = None  # dense
    ref: str | None = None  # buffer name of the local reference copy (flat), if kept
    lora: LoraFactors | None = None
    a_sharded: bool = False  # LoRA A factors are row shards (zero-padded to full rows and summed)
    extra: dict[str, Any] = field(default_factory=dict)


def dot_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """⟨a, b⟩ of two flat tensors as a 0-d ``acc`` tensor; low-precision inputs are widened chunk by chunk."""
    if a.dtype == acc and b.dtype == acc:
        return torch.dot(a, b)
    total = torch.zeros((), dtype=acc, device=a.device)
    for i in range(0, a.numel(), _CHUNK):
        total += torch.dot(a[i : i + _CHUNK].to(acc), b[i : i + _CHUNK].to(acc))
    return total


def mv_acc(u: torch.Tensor, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(K,) ``acc`` tensor of ⟨u_k, x⟩ for the rows of ``u`` (K × n) and a flat ``x``."""
    if u.shape[0] == 1:
        return dot_acc(u[0], x, acc).reshape(1)
    if u.dtype == acc and x.dtype == acc:
        return torch.mv(u, x)
    total = torch.zeros(u.shape[0], dtype=acc, device=u.device)
    for i in range(0, x.numel(), _CHUNK):
        total += torch.mv(u[:, i : i + _CHUNK].to(acc), x[i : i + _CHUNK].to(acc))
    return total


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x with a zero (not NaN/Inf) gradient at x = 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


class _DenseStats(torch.autograd.Function):
    """(P, N) for dense tensors: P = ⟨d, u_k⟩ for all (tensor, direction) pairs, N = ‖d‖² per tensor, d = θ − θ_ref
    (or θ when no reference copy is kept). The math runs without autograd; backward is written out."""

    @staticmethod
    def forward(ctx: Any, plan: list[tuple[Any, ...]], *xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ps, ns = [], []
        acc = plan[0][3]
        for x, (u, ref, want_n, _) in zip(xs, plan, strict=True):
            flat = x.detach().reshape(-1)
            if ref is None:
                ps.append(mv_acc(u, flat, acc))
                ns.append(torch.zeros((), dtype=acc, device=u.device))
            elif flat.device.type == "cpu":
                p, n = _diff_stats_cpu(flat, ref, u, acc, want_n)
                ps.append(p)
                ns.append(n)
            else:
                d = torch.sub(flat, ref)
                ps.append(mv_acc(u, d, acc))
                ns.append(dot_acc(d, d, acc) if want_n else torch.zeros((), dtype=acc, device=u.device))
        ctx.plan = plan
        ctx.save_for_backward(*xs)
        return torch.cat(ps), torch.stack(ns)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, gp: torch.Tensor, gn: torch.Tensor) -> tuple[Any, ...]:
        xs = ctx.saved_tensors
        grads: list[torch.Tensor | None] = []
        offset = 0
        cpu = gp.device.type == "cpu"
        gp_host = gp.tolist() if cpu else None
        gn_host = gn.tolist() if cpu else None
        for i, (x, (u, ref, want_n, _)) in enumerate(zip(xs, ctx.plan, strict=True)):
            k = u.shape[0]
            g = gp[offset : offset + k]
            n_term = want_n and ref is not None
            if gp_host is not None and gn_host is not None:
                # On the CPU, zero coefficients (step 0 of cosine2) cost nothing to detect: skip the whole pass.
                coefs = gp_host[offset : offset + k]
                offset += k
                two_gn = 2 * gn_host[i] if n_term else 0.0
                if not any(coefs) and two_gn == 0.0:
                    grads.append(None)
                    continue
                # Shaped like x and not a view of anything: autograd can then add the task gradient into it in place
                # instead of allocating the sum (a view keeps its base alive, which forbids that).
                out = torch.mul(u[0].view(x.shape), coefs[0])
                flat = out.view(-1)
                for j in range(1, k):
                    flat.add_(u[j], alpha=coefs[j])
                if two_gn != 0.0:
                    _add_scaled_diff_cpu(flat, x.detach().reshape(-1), ref, two_gn)
                del flat
            else:
                offset += k
                out = u[0].view(x.shape) * g[0]
                flat = out.view(-1)
                for j in range(1, k):
                    flat.addcmul_(u[j], g[j])
                if n_term:
                    flat.addcmul_(torch.sub(x.detach().reshape(-1), ref), 2 * gn[i])
                del flat
            grads.append(out if out.dtype == x.dtype else out.to(x.dtype))
        return (None, *grads)


def _diff_stats_cpu(
    flat: torch.Tensor, ref: torch.Tensor, u: torch.Tensor, acc: torch.dtype, want_n: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(⟨d, u_k⟩, ‖d‖²) for d = flat − ref, one cache-sized chunk of d at a time: on the CPU a full-size temporary
    costs more in page faults than the arithmetic."""
    scratch = torch.empty(min(_CPU_CHUNK, flat.numel()), dtype=flat.dtype)
    ps, ns = [], []
    for i in range(0, flat.numel(), _CPU_CHUNK):
        d = torch.sub(
            flat[i : i + _CPU_CHUNK], ref[i : i + _CPU_CHUNK], out=scratch[: min(_CPU_CHUNK, flat.numel() - i)]
        )
        ps.append(mv_acc(u[:, i : i + _CPU_CHUNK], d, acc))
        if want_n:
            ns.append(dot_acc(d, d, acc))
    if not ps:  # an empty shard (FSDP2, more ranks than rows)
        return torch.zeros(u.shape[0], dtype=acc), torch.zeros((), dtype=acc)
    p = torch.stack(ps).sum(0) if len(ps) > 1 else ps[0]
    n = (torch.stack(ns).sum() if len(ns) > 1 else ns[0]) if want_n else torch.zeros((), dtype=acc)
    return p, n


def _add_scaled_diff_cpu(out: torch.Tensor, flat: torch.Tensor, ref: torch.Tensor, scale: float) -> None:
    """out += scale·(flat − ref), chunked like :func:`_diff_stats_cpu`."""
    scratch = torch.empty(min(_CPU_CHUNK, flat.numel()), dtype=flat.dtype)
    for i in range(0, flat.numel(), _CPU_CHUNK):
        d = torch.sub(
            flat[i : i + _CPU_CHUNK], ref[i : i + _CPU_CHUNK], out=scratch[: min(_CPU_CHUNK, flat.numel() - i)]
        )
        out[i : i + _CPU_CHUNK].add_(d, alpha=scale)


def _lora_pieces(t: Target, u: torch.Tensor, acc: torch.dtype) -> list[torch.Tensor]:
    """[M (K × R × in), G (R × R), A (R × in)] of a LoRA layer from its local shards (differentiable)."""
    assert t.lora is not None
    bs, as_ = [], []
    for (a, b), scale in zip(t.lora.factors, t.lora.scalings(), strict=True):
        a_local, b_local = local(a).to(acc), local(b).to(acc)
        if t.a_sharded:  # rows of A held here, zero elsewhere: the sum over ranks is the full A
            top = row_offset(a)
            a_local = torch.nn.functional.pad(a_local, (0, 0, top, a.shape[0] - top - a_local.shape[0]))
        as_.append(a_local)
        bs.append(b_local * scale)
    b_cat = torch.cat(bs, dim=1)
    a_cat = torch.cat(as_, dim=0)
    m = torch.matmul(b_cat.t().to(u.dtype), u).to(acc)
    return [m, b_cat.t() @ b_cat, a_cat]


def group_stats(
    targets: list[Target], buffers: dict[str, torch.Tensor], key: ReduceKey, *, want_n: bool, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, N) of one group of targets (same reduce key), dense ones first, summed over the group's ranks."""
    dense = [t for t in targets if t.lora is None]
    lora = [t for t in targets if t.lora is not None]
    parts: list[torch.Tensor] = []
    if dense:
        plan = [(buffers[t.u], buffers[t.ref] if t.ref else None, want_n, acc) for t in dense]
        parts.extend(_DenseStats.apply(plan, *[local(t.param) for t in dense]))
    pieces = [_lora_pieces(t, buffers[t.u], acc) for t in lora]
    if key is not None:
        # A replicated on every rank is complete already; only row-sharded A factors are summed.
        summed = parts + [q for t, ps in zip(lora, pieces, strict=True) for q in (ps if t.a_sharded else ps[:2])]
        flat = all_reduce_sum(torch.cat([q.reshape(-1) for q in summed]), key)
        out, offset = [], 0
        for q in summed:
            out.append(flat[offset : offset + q.numel()].view(q.shape))
            offset += q.numel()
        parts, rest = out[: len(parts)], out[len(parts) :]
        for i, t in enumerate(lora):
            m, g = rest.pop(0), rest.pop(0)
            pieces[i] = [m, g, rest.pop(0) if t.a_sharded else pieces[i][2]]
    p_list = [parts[0]] if dense else []
    n_list = [parts[1]] if dense else []
    for m, g, a in pieces:
        p_list.append((m * a).sum(dim=(1, 2)))
        n_list.append((g * (a @ a.t())).sum().reshape(1))
    return torch.cat(p_list), torch.cat(n_list)


def check_lora_sharding(lf: LoraFactors, name: str) -> tuple[ReduceKey, bool]:
    """(reduce key of B, whether A is row-sharded) for a LoRA layer; τ is sharded like B (rows)."""
    from capmerge.ortho._dist import reduce_key

    b0 = lf.factors[0][1]
    key = reduce_key(b0)
    a_sharded = [reduce_key(a) is not None for a, _ in lf.factors]
    for a, b in lf.factors:
        for t in (a, b):
            if is_dtensor(t) and any(pl.is_shard() and pl.dim != 0 for pl in t.placements):
                raise UsageError("LoRA factors sharded on a dimension other than 0 are not supported", name)
        if reduce_key(b) != key or (reduce_key(a) not in (None, key)):
            raise UsageError("the LoRA factors of one layer are sharded differently", name)
    if any(a_sharded) and not all(a_sharded):
        raise UsageError("the LoRA A factors of one layer are sharded differently", name)
    if any(a_sharded) and key is None:
        raise UsageError("LoRA A is sharded but B is not", name)
    return key, all(a_sharded) and bool(a_sharded)
