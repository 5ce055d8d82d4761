"""The fused merge: prune each of K vectors, elect signs, combine, normalise, θ + α·δ — one pass over memory.

Semantics are those of :mod:`capmerge.functional` and the CPU kernel (``capmerge/_native.c``), bit for bit: float32
math with every product and sum rounded on its own, a tie in the sign election elects +, zeros never agree, DARE
masks from Philox of (per-tensor key, element index), one rounding to the output dtype. Magnitude / breadcrumbs
thresholds are computed beforehand (exact k-th largest magnitudes) and passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from capmerge.errors import UsageError
from capmerge.kernels.device import MAX_TERMS
from capmerge.kernels.utils import BLOCK, LAUNCH, check_tensors, grid, load_f32, philox_uniform, store_round
from capmerge.merge.compute import PRUNE_BAND, PRUNE_MAGNITUDE, PRUNE_NONE, PRUNE_RANDOM, SIGN_CODES


class Term(NamedTuple):
    """One vector of a merge: ``a`` (τ) or ``a − b``, its weight and pruning (modes of :mod:`capmerge.merge.compute`):
    magnitude keeps |τ| ≥ p1; random keeps philox_uniform(key, index) < p1 and divides kept entries by p2 when p2 ≠ 0;
    band keeps p1 ≤ |τ| < p2."""

    a: torch.Tensor
    b: torch.Tensor | None = None
    weight: float = 1.0
    mode: int = PRUNE_NONE
    p1: float = 0.0
    p2: float = 0.0
    key: int = 0


@triton.jit
def _merge_kernel(
    OUTS, ALPHAS, base_ptr, A, B, W, P1, P2, keys_ptr, n, offset,
    NOUT: tl.constexpr, K: tl.constexpr, HAS_B: tl.constexpr, MODES: tl.constexpr,
    SIGN: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: tensors over 2^31 elements
    mask = offs < n
    # 1. prune each term (kept in registers: K is a compile-time constant)
    terms = ()
    for i in tl.static_range(K):
        t = load_f32(A[i], offs, mask)
        if HAS_B[i]:
            t = t - load_f32(B[i], offs, mask)
        if MODES[i] == 1:  # magnitude
            t = tl.where(tl.abs(t) >= P1[i], t, 0.0)
        elif MODES[i] == 3:  # band (breadcrumbs)
            t = tl.where((tl.abs(t) >= P1[i]) & (tl.abs(t) < P2[i]), t, 0.0)
        elif MODES[i] == 2:  # random (DARE)
            # Philox4x32-10 of counter index // 4 and key (key_lo, key_hi), word index % 4
            k_lo = tl.load(keys_ptr + 2 * i).to(tl.uint32).to(tl.uint64)
            k_hi = tl.load(keys_ptr + 2 * i + 1).to(tl.uint32).to(tl.uint64)
            u = philox_uniform((k_hi << 32) | k_lo, offs + offset)
            t = tl.math.div_rn(t, tl.where(P2[i] != 0.0, P2[i], 1.0))  # rescale (÷1 is exact)
            t = tl.where(u < P1[i], t, 0.0)
        terms = terms + (t,)
    # 2-3. elect signs, combine (in order i = 1..K from 0), normalise
    d = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    if SIGN == 0:
        for i in tl.static_range(K):
            d = d + W[i] * terms[i]
            den = den + W[i]
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(K):
            if SIGN == 1:
                s = s + W[i] * terms[i]
            else:
                s = s + (tl.where(terms[i] > 0.0, 1.0, 0.0) - tl.where(terms[i] < 0.0, 1.0, 0.0))
        pos = s >= 0.0  # a tie elects +; NaN elects −
        for i in tl.static_range(K):
            agree = (pos & (terms[i] > 0.0)) | (~pos & (terms[i] < 0.0))  # zeros never agree
            d = d + tl.where(agree, W[i] * terms[i], 0.0)
            den = den + tl.where(agree, W[i], 0.0)
    if NORMALIZE:
        d = tl.math.div_rn(d, tl.where(den > 0.0, den, 1.0))
    # 4. θ + α·δ for every output, rounded once
    base = load_f32(base_ptr, offs, mask)
    for o in tl.static_range(NOUT):
        if K > 0:
            store_round(OUTS[o], offs, base + ALPHAS[o] * d, mask)
        else:  # a pure cast: -0.0 stays -0.0
            store_round(OUTS[o], offs, base, mask)


def _split_key(key: int) -> tuple[int, int]:
    key &= (1 << 64) - 1
    return key & 0xFFFFFFFF, key >> 32


def merge(
    outs: Sequence[torch.Tensor],
    alphas: Sequence[float],
    base: torch.Tensor,
    terms: Sequence[Term],
    *,
    sign: str = "none",
    normalize: bool = False,
    offset: int = 0,
) -> None:
    """For each (out, α): ``out = round(base + α·δ)``, δ the pruned, sign-elected, combined terms.

    ``offset`` is the element index of ``base[0]`` in its whole tensor (DARE masks depend on the index). An output may
    be ``base`` itself (in-place apply: every element is read before it is written). Up to ``MAX_TERMS`` terms.
    """
    if len(outs) != len(alphas) or not outs:
        raise UsageError(f"merge: {len(outs)} outputs for {len(alphas)} alphas")
    if len(terms) > MAX_TERMS:
        raise UsageError(f"merge: at most {MAX_TERMS} vectors per launch, got {len(terms)}")
    if sign not in SIGN_CODES:
        raise UsageError(f"merge: unknown sign method {sign!r}")
    tensors = {f"out[{i}]": o for i, o in enumerate(outs)} | {"base": base}
    for i, t in enumerate(terms):
        if t.mode not in (PRUNE_NONE, PRUNE_MAGNITUDE, PRUNE_RANDOM, PRUNE_BAND):
            raise UsageError(f"merge: unknown prune mode {t.mode}")
        tensors[f"terms[{i}].a"] = t.a
        if t.b is not None:
            tensors[f"terms[{i}].b"] = t.b
    n = check_tensors("merge", tensors)
    if n == 0:
        return
    # 64-bit keys as int32 pairs in a small tensor: as kernel arguments they would specialise the compiled kernel
    words = [w - (1 << 32) if w >= 1 << 31 else w for t in terms for w in _split_key(int(t.key))]
    keys = torch.tensor(words or [0, 0], dtype=torch.int32).to(base.device)
    _merge_kernel[grid(n)](
        tuple(outs), tuple(float(a) for a in alphas), base,
        tuple(t.a for t in terms), tuple(t.a if t.b is None else t.b for t in terms),
        tuple(float(t.weight) for t in terms), tuple(float(t.p1) for t in terms), tuple(float(t.p2) for t in terms),
        keys, n, int(offset),
        NOUT=len(outs), K=len(terms), HAS_B=tuple(t.b is not None for t in terms),
        MODES=tuple(int(t.mode) for t in terms), SIGN=SIGN_CODES[sign], NORMALIZE=bool(normalize), BLOCK=BLOCK,
        **LAUNCH,
    )  # fmt: skip
