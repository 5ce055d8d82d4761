"""Triton building blocks shared by the kernels, and the launchers' argument checks.

Every kernel computes in float32 and rounds once on store. Conversions are written with integer bit operations
(bfloat16 ↔ float32) so that compiled kernels and Triton's interpreter — whose own bfloat16 casts truncate and
mishandle subnormals — give the same bits as the CPU path (``capmerge/_native.c``): round to nearest even, NaN kept
quiet with its sign. Kernels are launched with ``enable_fp_fusion=False`` and divide with ``div_rn``, so products
and sums are rounded separately (no FMA), exactly as on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from capmerge.errors import UsageError
from capmerge.kernels.device import interpreting

BLOCK = 1024
NUM_WARPS = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


@triton.jit
def load_f32(ptr, offs, mask):
    """Elements ``offs`` of ``ptr`` as float32 (0 where masked); bfloat16 widened bit-exactly."""
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def store_round(ptr, offs, x, mask):
    """Store float32 ``x`` into ``ptr``'s dtype, rounded to nearest even (one rounding)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + (0x7FFF + ((b >> 16) & 1))) >> 16
        r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, (b >> 16) | 0x40, r)  # NaN: quiet, sign kept
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    elif ptr.dtype.element_ty == tl.float32:
        tl.store(ptr + offs, x, mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def philox_uniform(key, index):
    """capmerge's uniform for each int64 element ``index``: word ``index % 4`` of ``tl.rand4x(key, index // 4)`` (one
    Philox4x32-10 counter serves four consecutive elements; the CPU computes each counter once)."""
    r0, r1, r2, r3 = tl.rand4x(key, index >> 2)
    w = index & 3
    return tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))


def check_tensors(what: str, tensors: dict[str, Any], n: int | None = None) -> int:
    """Validate kernel arguments: float32/bfloat16/float16, contiguous, one device (CUDA, or CPU when interpreted),
    equal element counts. Returns the element count."""
    dev = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise UsageError(f"{what}: {name} has dtype {t.dtype}; the kernels take float32, bfloat16, float16")
        if not t.is_contiguous():
            raise UsageError(f"{what}: {name} must be contiguous")
        if dev is None:
            dev = t.device
        elif t.device != dev:
            raise UsageError(f"{what}: {name} is on {t.device}, the other tensors on {dev}")
        if n is None:
            n = t.numel()
        elif t.numel() != n:
            raise UsageError(f"{what}: {name} has {t.numel()} elements, expected {n}")
    if dev is not None and dev.type != "cuda" and not (interpreting() and dev.type == "cpu"):
        raise UsageError(f"{what}: tensors must be on a CUDA device (got {dev}; TRITON_INTERPRET=1 runs on the CPU)")
    return n or 0


def grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)
