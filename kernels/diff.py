"""τ = aux − base: one pass, float32 math, rounded once to the output dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from capmerge.kernels.utils import BLOCK, LAUNCH, check_tensors, grid, load_f32, store_round


@triton.jit
def _diff_kernel(out_ptr, a_ptr, b_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: tensors over 2^31 elements
    mask = offs < n
    store_round(out_ptr, offs, load_f32(a_ptr, offs, mask) - load_f32(b_ptr, offs, mask), mask)


def diff(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out = round(a − b)`` elementwise (any of float32/bfloat16/float16 in and out; ``out`` defaults to a's dtype).

    All tensors contiguous, on one CUDA device (CPU under ``TRITON_INTERPRET=1``), with equal element counts.
    """
    if out is None:
        out = torch.empty_like(a)
    n = check_tensors("diff", {"out": out, "a": a, "b": b})
    if n:
        _diff_kernel[grid(n)](out, a, b, n, BLOCK=BLOCK, **LAUNCH)
    return out
