"""The one dispatch point between the Triton kernels and the CPU path.

* Engine blocks (:func:`diff_block`, :func:`merge_block`): the streaming engine hands raw host buffers (pinned when
  the device is a GPU, see :func:`host_buffer`); each block is cut into chunks that go host → device → kernel →
  host on a few CUDA streams in turn, so transfers in both directions overlap the kernels. Dtypes the kernels do
  not take (float64, float8) and merges of more than ``MAX_TERMS`` vectors run on the CPU path instead — same values.
* Tensors (:func:`merge_tensors`): library calls on tensors already on the GPU run the kernels there, no host copy.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch

from capmerge._torch import as_tensor
from capmerge.kernels.device import MAX_TERMS, torch_device
from capmerge.kernels.diff import diff as _diff
from capmerge.kernels.merge import Term
from capmerge.kernels.merge import merge as _merge
from capmerge.merge import compute

KERNEL_CODES = ("F32", "BF16", "F16")
CHUNK = 1 << 19  # elements per transfer/compute step of a block (1 MiB of bf16)
STREAMS = 3


def host_buffer(nbytes: int, device: str) -> Any:
    """A writable host buffer for the engine: page-locked on a GPU (async copies), a plain bytearray otherwise."""
    tdev = torch_device(device)
    if tdev.type != "cuda":
        return bytearray(nbytes)
    return torch.empty(max(1, nbytes), dtype=torch.uint8, pin_memory=True).numpy()[:nbytes]


@functools.lru_cache(maxsize=8)
def _streams(device: str) -> tuple[Any, ...]:
    tdev = torch_device(device)
    if tdev.type != "cuda":
        return (None,)
    return tuple(torch.cuda.Stream(device=tdev) for _ in range(STREAMS))


def _stream_ctx(stream: Any) -> Any:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _flags(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """compute.NONZERO | OVERFLOW | NONFINITE of an output chunk, as a device scalar (no host sync)."""
    o = out.float()
    bad = ~torch.isfinite(o)
    fin = bad.clone()
    for t in inputs:
        fin &= torch.isfinite(t)
    return (
        (o != 0).any().to(torch.int32) * compute.NONZERO
        + bad.any().to(torch.int32) * compute.NONFINITE
        + fin.any().to(torch.int32) * compute.OVERFLOW
    )


def _run_chunks(device: str, n: int, step: Any) -> int:
    """Call ``step(start, end)`` for each chunk on the device's streams in turn; sync; OR the returned flags."""
    streams = _streams(device)
    flags = []
    for i, s in enumerate(range(0, n, CHUNK)):
        stream = streams[i % len(streams)]
        with _stream_ctx(stream):
            flags.append(step(s, min(n, s + CHUNK)))
    for stream in streams:
        if stream is not None:
            stream.synchronize()
    out = 0
    for f in flags:
        out |= int(f)
    return out


def diff_block(
    device: str, out: memoryview, out_code: str, a: memoryview, a_code: str, b: memoryview, b_code: str, n: int
) -> int:
    """:func:`capmerge.merge.compute.diff_block` on the device."""
    if not all(c in KERNEL_CODES for c in (out_code, a_code, b_code)):
        return compute.diff_block(out, out_code, a, a_code, b, b_code, n)
    tdev = torch_device(device)
    ha, hb, ho = as_tensor(a, a_code)[:n], as_tensor(b, b_code)[:n], as_tensor(out, out_code)[:n]

    def step(s: int, e: int) -> torch.Tensor:
        da, db = _move(ha[s:e], tdev), _move(hb[s:e], tdev)
        do = torch.empty(e - s, dtype=ho.dtype, device=tdev)
        _diff(da, db, do)
        f = _flags(do, [da, db])
        _back(ho[s:e], do)
        return f

    return _run_chunks(device, n, step)


def _move(t: torch.Tensor, tdev: Any) -> torch.Tensor:
    return t.to(tdev, non_blocking=True) if t.device != tdev else t


def _back(host: torch.Tensor, dev: torch.Tensor) -> None:
    if host.data_ptr() != dev.data_ptr():
        host.copy_(dev, non_blocking=True)


def merge_block(
    device: str,
    outs: list[tuple[memoryview, str, float]],
    base: memoryview,
    base_code: str,
    n: int,
    terms: list[compute.TermArgs],
    *,
    sign: str = "none",
    normalize: bool = False,
    offset: int = 0,
) -> int:
    """:func:`capmerge.merge.compute.merge_block` on the device (same arguments, same results)."""
    codes = [base_code, *(c for _, c, _ in outs), *(t[1] for t in terms), *(t[3] for t in terms if t[2] is not None)]
    if len(terms) > MAX_TERMS or not all(c in KERNEL_CODES for c in codes) or any(t[5] > 3 for t in terms):
        # the model-centric modes (PRUNE_BITS: keep bits a CPU statistics pass recorded, PRUNE_NEAR) are the CPU's
        return compute.merge_block(outs, base, base_code, n, terms, sign=sign, normalize=normalize, offset=offset)
    tdev = torch_device(device)
    hbase = as_tensor(base, base_code)[:n]
    houts = [as_tensor(buf, code)[:n] for buf, code, _ in outs]
    alphas = [float(a) for _, _, a in outs]
    hterms = [
        (as_tensor(a, ac)[:n], as_tensor(b, bc)[:n] if b is not None else None, w, mode, p1, p2, key)
        for a, ac, b, bc, w, mode, p1, p2, key in terms
    ]

    def step(s: int, e: int) -> torch.Tensor:
        dbase = _move(hbase[s:e], tdev)
        dterms = [
            Term(_move(a[s:e], tdev), _move(b[s:e], tdev) if b is not None else None, w, mode, p1, p2, key)
            for a, b, w, mode, p1, p2, key in hterms
        ]
        douts = [torch.empty(e - s, dtype=h.dtype, device=tdev) for h in houts]
        _merge(douts, alphas, dbase, dterms, sign=sign, normalize=normalize, offset=offset + s)
        ins = [dbase, *(t.a for t in dterms), *(t.b for t in dterms if t.b is not None)]
        f = functools.reduce(operator.or_, (_flags(o, ins) for o in douts))
        for h, o in zip(houts, douts, strict=True):
            _back(h[s:e], o)
        return f

    return _run_chunks(device, n, step)


def merge_tensors(
    out: torch.Tensor,
    base: torch.Tensor,
    terms: Sequence[Term],
    *,
    alpha: float = 1.0,
    sign: str = "none",
    normalize: bool = False,
) -> bool:
    """``out = round(base + α·δ)`` with the kernels when they can take these tensors; ``out`` may be ``base``.

    Returns False (nothing done) when they cannot — a dtype other than float32/bfloat16/float16, a non-contiguous
    tensor, more than ``MAX_TERMS`` vectors, tensors on different devices — and the caller uses the torch path.
    """
    tensors = [out, base, *(t.a for t in terms), *(t.b for t in terms if t.b is not None)]
    if len(terms) > MAX_TERMS or any(t.dtype not in (torch.float32, torch.bfloat16, torch.float16) for t in tensors):
        return False
    if any(not t.is_contiguous() or t.device != out.device for t in tensors):
        return False
    _merge([out.reshape(-1)], [alpha], base.reshape(-1),
           [t._replace(a=t.a.reshape(-1), b=t.b.reshape(-1) if t.b is not None else None) for t in terms],
           sign=sign, normalize=normalize)  # fmt: skip
    return True


__all__ = ["diff_block", "host_buffer", "merge_block", "merge_tensors"]
