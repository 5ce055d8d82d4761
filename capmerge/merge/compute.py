"""Block kernels of the streaming engine: the arithmetic on one block of raw bytes.

Precision semantics (the same on every path):

* inputs are widened to float32 (float64 when any input or the output is float64);
* ``diff``:  ``out = round(a - b)``;
* ``merge``: ``d = ((0 + w_1·v_1) + w_2·v_2) + …`` then ``out = round(base + α·d)`` — every product and sum rounded
  to float32 on its own (no fused multiply-add), and one final rounding (nearest-even) to the output dtype.

The native kernel (``capmerge._native``, C, built at install) handles float32 / float16 / bfloat16 without importing
torch, which keeps the CLI start-up small. Everything else (float64, float8) and machines where the kernel could
not be built use the torch path below, which computes the same values. ``CAPMERGE_NO_NATIVE=1`` forces torch.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from capmerge import _native
except ImportError:  # pragma: no cover - exercised on machines without a C compiler
    _native = None

NATIVE_CODES = {"F32": 0, "F16": 1, "BF16": 2}
NONZERO = 1  # some output element is non-zero
OVERFLOW = 2  # some output element is NaN/Inf although all its inputs were finite
NONFINITE = 4  # some output element is NaN/Inf


NATIVE_CPU_CAPS = ("avx2", "baseline")  # CAPMERGE_NATIVE_CPU: the native loops capped (capmerge/_native.c)


def native_available() -> bool:
    cap = os.environ.get("CAPMERGE_NATIVE_CPU")
    if cap and cap not in NATIVE_CPU_CAPS:
        from capmerge.errors import CapmergeError

        raise CapmergeError(f"CAPMERGE_NATIVE_CPU must be {' or '.join(NATIVE_CPU_CAPS)} (or unset), got {cap!r}")
    return _native is not None and not os.environ.get("CAPMERGE_NO_NATIVE")


def use_native(*codes: str) -> bool:
    return native_available() and all(c in NATIVE_CODES for c in codes)


def diff_block(out: memoryview, out_code: str, a: memoryview, a_code: str, b: memoryview, b_code: str, n: int) -> int:
    """``out[:n] = round(a[:n] - b[:n])`` on the CPU; returns flags (NONZERO | OVERFLOW | NONFINITE). On a GPU,
    :func:`capmerge.kernels.dispatch.diff_block` computes the same values (it depends on this module, not the reverse).
    """
    if use_native(out_code, a_code, b_code):
        assert _native is not None
        return int(_native.diff(out, NATIVE_CODES[out_code], a, NATIVE_CODES[a_code], b, NATIVE_CODES[b_code], n))
    return _torch_diff(out, out_code, a, a_code, b, b_code, n)


PRUNE_NONE, PRUNE_MAGNITUDE, PRUNE_RANDOM, PRUNE_BAND, PRUNE_BITS, PRUNE_NEAR = 0, 1, 2, 3, 4, 5
SIGN_CODES = {"none": 0, "total": 1, "frequency": 2, "sum": 3}
# sign "sum": elected on the unweighted sum of the pruned terms (SCE), which are then combined with their weights.
# normalize: False/0 none, True/1 divide by Σ w_i·m_i where it is > 0 (else by 1), NORMALIZE_FLOOR divide by
# max(Σ w_i·m_i, 1e-6) (SCE).
NORMALIZE_FLOOR = 2

# One term of a merge: the vector a (or the difference a - b), its weight, and how it is pruned:
# (a, a_code, b | None, b_code, weight, mode, p1, p2, key) — mode PRUNE_MAGNITUDE keeps |t| >= p1; PRUNE_RANDOM keeps
# entries whose Philox uniform (key, element index) is < p1 and divides them by p2 when p2 != 0; PRUNE_BAND keeps
# p1 <= |t| < p2; PRUNE_BITS keeps the entries whose bit is set in a tenth item, a bit mask over the whole tensor
# (element i at byte i // 8, bit i % 8: the keep bits a statistics pass recorded, so that a merge pass need not draw
# the same Philox numbers again) and multiplies them by p1 when p1 != 0 (a rescale); PRUNE_NEAR scales t by
# clamp(p1 / max(|t|, 1e-6), 0, 1) (mergekit's nearswap).
TermArgs = tuple  # (a, a_code, b, b_code, weight, mode, p1, p2, key[, bits])


def merge_block(
    outs: list[tuple[memoryview, str, float]],
    base: memoryview,
    base_code: str,
    n: int,
    terms: list[TermArgs],
    *,
    sign: str = "none",
    normalize: bool | int = False,
    offset: int = 0,
) -> int:
    """For each (out, code, α) in ``outs``: ``out[:n] = round(base + α·δ)`` with δ the pruned, sign-elected,
    combined terms (see :mod:`capmerge.functional`). ``offset`` is the element index of ``base[0]`` in its tensor
    (DARE masks depend on it). Returns flags OR-ed over the outputs. On a GPU:
    :func:`capmerge.kernels.dispatch.merge_block`."""
    codes = [base_code, *(c for _, c, _ in outs), *(t[1] for t in terms), *(t[3] for t in terms if t[2] is not None)]
    if use_native(*codes) and len(terms) <= 64 and len(outs) <= 64:
        assert _native is not None
        native_terms = [
            (a, NATIVE_CODES[ac], b, NATIVE_CODES.get(bc, 0), float(w), mode, float(p1), float(p2), key, *bits)
            for a, ac, b, bc, w, mode, p1, p2, key, *bits in terms
        ]
        native_outs = [(buf, NATIVE_CODES[c], float(alpha)) for buf, c, alpha in outs]
        return int(
            _native.merge(
                native_outs, base, NATIVE_CODES[base_code], n, native_terms, SIGN_CODES[sign], int(normalize), offset
            )  # fmt: skip
        )
    return _torch_merge(outs, base, base_code, n, terms, sign, normalize, offset)


def bit_mask(bits: Any, offset: int, n: int) -> Any:
    """Elements [offset, offset + n) of a PRUNE_BITS mask as a torch bool tensor."""
    import numpy as np
    import torch

    raw = np.frombuffer(bits, dtype=np.uint8)[offset // 8 : (offset + n + 7) // 8 + 1]
    unpacked = np.unpackbits(raw, bitorder="little")[offset % 8 : offset % 8 + n]
    return torch.from_numpy(unpacked.astype(bool))


def _compute_dtype(*codes: str) -> Any:
    import torch

    return torch.float64 if "F64" in codes else torch.float32


def _flags(out_t: Any, inputs: list[Any]) -> int:
    import torch

    o = out_t.float() if out_t.dtype not in (torch.float32, torch.float64) else out_t
    flags = NONZERO if bool((o != 0).any()) else 0
    bad = ~torch.isfinite(o)
    if bool(bad.any()):
        flags |= NONFINITE
        for t in inputs:
            bad &= torch.isfinite(t)
        if bool(bad.any()):
            flags |= OVERFLOW
    return flags


def _torch_diff(out: memoryview, out_code: str, a: memoryview, a_code: str, b: memoryview, b_code: str, n: int) -> int:
    from capmerge._torch import as_tensor

    cd = _compute_dtype(out_code, a_code, b_code)
    ta = as_tensor(a, a_code)[:n].to(cd)
    tb = as_tensor(b, b_code)[:n].to(cd)
    to = as_tensor(out, out_code)[:n]
    to.copy_(ta - tb)
    return _flags(to, [ta, tb])


def _torch_merge(
    outs: list[tuple[memoryview, str, float]],
    base: memoryview,
    base_code: str,
    n: int,
    terms: list[TermArgs],
    sign: str,
    normalize: bool,
    offset: int,
) -> int:
    import torch

    from capmerge import functional as F
    from capmerge._torch import as_tensor

    cd = _compute_dtype(base_code, *(c for _, c, _ in outs), *(t[1] for t in terms))
    pruned, ins, weights = [], [], []
    for a, ac, b, bc, w, mode, p1, p2, key, *bits in terms:
        t = as_tensor(a, ac)[:n].to(cd)
        ins.append(t)
        if b is not None:
            tb = as_tensor(b, bc)[:n].to(cd)
            ins.append(tb)
            t = t - tb
        if mode == PRUNE_MAGNITUDE:
            t = torch.where(t.abs() >= p1, t, torch.zeros_like(t))
        elif mode == PRUNE_BAND:
            t = torch.where((t.abs() >= p1) & (t.abs() < p2), t, torch.zeros_like(t))
        elif mode == PRUNE_RANDOM:
            u = F.philox_range(key, offset, n)
            kept = t / torch.tensor(p2, dtype=cd) if p2 != 0 else t
            t = torch.where(u < torch.tensor(p1, dtype=torch.float32), kept, torch.zeros_like(t))
        elif mode == PRUNE_BITS:
            kept = t * torch.tensor(p1, dtype=cd) if p1 != 0 else t
            t = torch.where(bit_mask(bits[0], offset, n), kept, torch.zeros_like(t))
        elif mode == PRUNE_NEAR:
            near = torch.tensor(p1, dtype=cd) / t.abs().clamp(min=torch.tensor(1e-6, dtype=cd))
            t = near.clamp(min=0, max=1) * t
        pruned.append(t)
        weights.append(w)
    tb = as_tensor(base, base_code)[:n].to(cd)
    ins.append(tb)
    d = None
    if pruned and sign == "none" and not normalize:  # plain weighted sum: keep float64 exact for float64 inputs
        d = torch.zeros(n, dtype=cd)
        for t, w in zip(pruned, weights, strict=True):
            d = d + torch.tensor(w, dtype=cd) * t
    elif pruned:
        floor = 1e-6 if normalize == NORMALIZE_FLOOR else 0.0
        d = F.combine(pruned, weights, sign=sign, normalize=bool(normalize), floor=floor).to(cd)
    flags = 0
    for buf, code, alpha in outs:
        to = as_tensor(buf, code)[:n]
        to.copy_(tb + torch.tensor(alpha, dtype=cd) * d if d is not None else tb)
        flags |= _flags(to, ins)
    return flags
