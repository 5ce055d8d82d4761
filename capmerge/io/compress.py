"""``capmerge compress``: turn a dense vector into a low-rank or sparse one (the format is
:mod:`capmerge.io.compression`), report what it achieved, and record it in the header."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from typing import Any

from capmerge.errors import UsageError
from capmerge.io.checkpoint import VECTOR_FORMAT_KEY, Checkpoint
from capmerge.io.compression import TENSORS_KEY, lowrank_dense, sparse_dense, vector_metadata, write_vector
from capmerge.io.compression_record import OPTIONS_KEY, REPORT_KEY, CompressionSummary, report_json
from capmerge.io.open import open_checkpoint

FULL_SVD_MAX = 2048  # exact SVD up to this min(m, n); randomized SVD above
PathLike = str | os.PathLike[str]


def _check_options(rank: int | None, energy: float | None, density: float | None, bits: int | None) -> str:
    given = [n for n, v in (("--rank", rank), ("--energy", energy), ("--density", density)) if v is not None]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of --rank, --energy, --density" + (f" (got {', '.join(given)})" if given else "")
        )
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise UsageError(f"--rank must be a positive integer, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy must be in (0, 1], got {energy}")
    if density is not None and not 0.0 < density <= 1.0:
        raise UsageError(f"--density must be in (0, 1], got {density}")
    if bits is not None and (density is None or bits != 8):
        raise UsageError(
            "--bits 8 is the only choice, and only with --density" if bits != 8 else "--bits needs --density"
        )
    return "sparse" if density is not None else "lowrank"


def _svd(m: Any, rank: int | None, energy: float | None, limit: int) -> tuple[Any, Any, Any, str] | None:
    """Factors U·S·Vh of the best rank-k approximation (k from ``rank`` or ``energy``), or None when k > limit."""
    import torch

    small = min(m.shape)
    total = float((m.double() ** 2).sum())
    if small <= FULL_SVD_MAX:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        method = "svd"
    else:
        q = min(small, max(rank or 0, 64) + 16)
        while True:  # randomized SVD, widened until the energy target is met (or low rank no longer pays)
            u, s, vh = torch.svd_lowrank(m, q=q, niter=4)
            vh = vh.T
            if rank is not None or float((s.double() ** 2).sum()) >= (energy or 1.0) * total or q >= limit:
                break
            q = min(small, 2 * q)
        method = "randomized-svd"
    if rank is not None:
        k = min(rank, s.numel())
    else:
        assert energy is not None
        cum = torch.cumsum(s.double() ** 2, 0)
        reached = (cum >= energy * total * (1 - 1e-12)).nonzero()
        if total == 0:
            k = 0
        elif len(reached):
            k = int(reached[0]) + 1
        else:
            return None
    if k > limit:
        return None
    return u[:, :k], s[:k], vh[:k], method


def _compress_one(t: Any, code: str, kind: str, rank: int | None, energy: float | None, density: float | None,
                  bits: int | None) -> tuple[str, list[tuple[str, Any]], dict[str, Any]]:  # fmt: skip
    """(storage, [(suffix, stored tensor)], extra report fields) for one tensor."""
    import torch

    from capmerge._torch import torch_dtype
    from capmerge.merge.methods import keep_count

    dt = torch_dtype(code)
    numel = t.numel()
    if kind == "lowrank":
        if t.dim() < 2 or numel == 0:
            return "dense", [("", t)], {"why": "not a matrix"}
        m = t.reshape(t.shape[0], -1).to(torch.float64 if code == "F64" else torch.float32)
        if not bool(torch.isfinite(m).all()):  # the SVD of NaN/Inf does not converge; the values are kept as they are
            return "dense", [("", t)], {"why": "holds NaN or Inf"}
        rows, cols = m.shape
        limit = (rows * cols - 1) // (rows + cols)  # the largest rank that stores fewer elements than dense
        got = _svd(m, rank, energy, limit)
        if got is None:
            return "dense", [("", t)], {"why": "low rank does not pay"}
        u, s, vh, method = got
        root = s.sqrt()
        b, a = (u * root).to(dt), (root[:, None] * vh).to(dt)
        return "lowrank", [(".lora_B", b), (".lora_A", a)], {"rank": int(s.numel()), "method": method}
    assert density is not None
    idx_dt = torch.int32 if numel < 2**31 else torch.int64
    k = keep_count(density, numel)
    value_bytes = 1 if bits else t.element_size()
    if k * (value_bytes + idx_dt.itemsize) + (4 if bits else 0) >= numel * t.element_size():
        return "dense", [("", t)], {"why": "sparse does not pay"}
    flat = t.reshape(-1)
    idx = torch.topk(flat.float().abs(), k, sorted=False).indices.sort().values
    vals = flat[idx]
    parts: list[tuple[str, Any]] = [(".indices", idx.to(idx_dt))]
    if bits:
        amax = float(vals.float().abs().max()) if k else 0.0
        scale = torch.tensor(amax / 127 if amax > 0 else 1.0, dtype=torch.float32)
        parts += [(".values", torch.round(vals.float() / scale).clamp(-127, 127).to(torch.int8)), (".scale", scale)]
    else:
        parts.append((".values", vals))
    return "sparse", parts, {"nnz": k, "bits": bits}


def compress(
    vector: PathLike | Checkpoint,
    output: PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    bits: int | None = None,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    force: bool = False,
) -> CompressionSummary:
    """Write a compressed copy of a capability vector, one tensor at a time.

    Args:
        vector: any vector (dense, already compressed, a LoRA adapter).
        output: a ``.safetensors`` file (or a directory: ``capvector.safetensors`` inside).
        rank: low rank: keep the top ``rank`` singular directions of every 2-D (or higher) tensor.
        energy: low rank: keep the fewest directions holding this fraction of each tensor's squared norm.
        density: sparse: keep this fraction of the entries, the largest in magnitude.
        bits: ``8`` stores sparse values as int8 with one float32 scale per tensor.
        include / exclude: regexes of tensors to compress (the others are stored dense).
        force: replace an existing output.

    Tensors where the compressed form would not be smaller stay dense (1-D tensors always do).

    Returns:
        A :class:`CompressionSummary`: per tensor and in total, bytes before/after, relative Frobenius error
        ‖τ − τ̂‖/‖τ‖ and cosine(τ, τ̂) of what a reader of the output gets back.
    """
    from capmerge.io.names import name_filter

    t0 = time.perf_counter()
    kind = _check_options(rank, energy, density, bits)
    keep = name_filter(include, exclude)
    ck = open_checkpoint(vector)
    summary = CompressionSummary(os.fspath(output), kind)
    table: dict[str, dict[str, Any]] = {}
    planned: list[tuple[str, str, tuple[int, ...]]] = []
    for name, info in ck.tensors.items():
        planned.append((name, info.dtype, info.shape))
        if info.is_float and len(info.shape) >= 2:
            r, c = info.shape[0], info.numel // max(info.shape[0], 1)
            planned += [(f"{name}.lora_B", info.dtype, (r, min(r, c))), (f"{name}.lora_A", info.dtype, (min(r, c), c))]
        planned += [(f"{name}.indices", "I64", (info.numel,)), (f"{name}.values", info.dtype, (info.numel,))]
        planned.append((f"{name}.scale", "F32", ()))
    sums = [0.0, 0.0, 0.0, 0.0]  # ‖τ‖², ‖τ − τ̂‖², <τ, τ̂>, ‖τ̂‖²

    def produce() -> Iterable[tuple[str, Any]]:
        for name, info in ck.tensors.items():
            t = ck.read_tensor(name)
            if info.is_float and keep(name):
                storage, parts, extra = _compress_one(t, info.dtype, kind, rank, energy, density, bits)
            else:
                storage, parts, extra = "dense", [("", t)], {"why": "not selected" if info.is_float else "not float"}
            stored = {s: p for s, p in parts}
            if storage == "lowrank":
                approx = lowrank_dense(stored[".lora_B"], stored[".lora_A"], info.dtype, info.shape)
            elif storage == "sparse":
                approx = sparse_dense(stored[".indices"], stored[".values"], stored.get(".scale"), info.dtype,
                                      info.shape)  # fmt: skip
            else:
                approx = t
            row = {"name": name, "storage": storage, **{k: v for k, v in extra.items() if v is not None}}
            row.update(_errors(t, approx, sums) if info.is_float else {"rel_error": 0.0, "cosine": 1.0})
            row["bytes_before"] = info.nbytes
            row["bytes_after"] = sum(p.numel() * p.element_size() for p in stored.values())
            summary.tensors.append(row)
            summary.bytes_before += row["bytes_before"]
            summary.bytes_after += row["bytes_after"]
            table[name] = {"dtype": info.dtype, "shape": list(info.shape), "storage": storage}
            del t, approx
            for suffix, p in parts:
                yield name + suffix, p

    def metadata() -> dict[str, str]:
        carried = {k: v for k, v in ck.metadata.items() if k.startswith("capmerge.") and k not in (VECTOR_FORMAT_KEY,
                   TENSORS_KEY, "capmerge.kind", "capmerge.version", OPTIONS_KEY, REPORT_KEY)}  # fmt: skip
        options = {"kind": kind, "rank": rank, "energy": energy, "density": density, "bits": bits}
        summary.rel_error, summary.cosine = _rel_cos(*sums)  # all tensors are written (and measured) when this runs
        return vector_metadata(kind, table, {
            **carried,
            OPTIONS_KEY: json.dumps({k: v for k, v in options.items() if v is not None}),
            REPORT_KEY: report_json(summary),
            "capmerge.source": ck.ref,
            "capmerge.source_fingerprint": ck.fingerprint(),
        })  # fmt: skip

    try:
        summary.files, summary.bytes_written = write_vector(output, [ck], planned, produce(), metadata, force=force)
    finally:
        ck.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _rel_cos(n2: float, e2: float, dot: float, a2: float) -> tuple[float, float]:
    """‖τ − τ̂‖/‖τ‖ and cos(τ, τ̂) from ‖τ‖², ‖τ − τ̂‖², ⟨τ, τ̂⟩ and ‖τ̂‖²."""
    rel = math.sqrt(e2 / n2) if n2 > 0 else 0.0
    return rel, dot / math.sqrt(n2 * a2) if n2 > 0 and a2 > 0 else float(n2 == a2)


def _errors(t: Any, approx: Any, sums: list[float]) -> dict[str, float]:
    """Relative Frobenius error and cosine of one tensor (float64), accumulated into ``sums`` for the totals."""
    x, y = t.double().reshape(-1), approx.double().reshape(-1)
    d = x - y
    terms = (float(x @ x), float(d @ d), float(x @ y), float(y @ y))
    for i, v in enumerate(terms):
        sums[i] += v
    rel, cos = _rel_cos(*terms)
    return {"rel_error": rel, "cosine": cos}
