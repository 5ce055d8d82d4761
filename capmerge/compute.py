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


def native_available() -> bool:
    return _native is not None and not os.environ.get("CAPMERGE_NO_NATIVE")


def use_native(*codes: str) -> bool:
    return native_available() and all(c in NATIVE_CODES for c in codes)


def diff_block(out: memoryview, out_code: str, a: memoryview, a_code: str, b: memoryview, b_code: str, n: int) -> int:
    """``out[:n] = round(a[:n] - b[:n])``; returns flags (NONZERO | OVERFLOW | NONFINITE)."""
    if use_native(out_code, a_code, b_code):
        assert _native is not None
        return int(_native.diff(out, NATIVE_CODES[out_code], a, NATIVE_CODES[a_code], b, NATIVE_CODES[b_code], n))
    return _torch_diff(out, out_code, a, a_code, b, b_code, n)


def merge_block(
    out: memoryview,
    out_code: str,
    base: memoryview,
    base_code: str,
    n: int,
    vectors: list[tuple[memoryview, str, float]],
    alpha: float,
) -> int:
    """``out[:n] = round(base + α·Σ w_i·v_i)``; ``vectors`` holds (buffer, dtype code, weight)."""
    if use_native(out_code, base_code, *(c for _, c, _ in vectors)) and len(vectors) <= 64:
        assert _native is not None
        vecs = [(buf, NATIVE_CODES[c], float(w)) for buf, c, w in vectors]
        return int(_native.merge(out, NATIVE_CODES[out_code], base, NATIVE_CODES[base_code], n, vecs, float(alpha)))
    return _torch_merge(out, out_code, base, base_code, n, vectors, alpha)


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
    out: memoryview,
    out_code: str,
    base: memoryview,
    base_code: str,
    n: int,
    vectors: list[tuple[memoryview, str, float]],
    alpha: float,
) -> int:
    import torch

    from capmerge._torch import as_tensor

    cd = _compute_dtype(out_code, base_code, *(c for _, c, _ in vectors))
    d = torch.zeros(n, dtype=cd)
    ins = []
    for buf, code, w in vectors:
        v = as_tensor(buf, code)[:n].to(cd)
        ins.append(v)
        d.add_(v * w)
    tb = as_tensor(base, base_code)[:n].to(cd)
    ins.append(tb)
    to = as_tensor(out, out_code)[:n]
    to.copy_(tb + d * alpha if vectors else tb)
    return _flags(to, ins)
