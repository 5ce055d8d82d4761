"""The library API behind ``capmerge diff`` and ``capmerge apply``: plan the jobs, stream them, commit atomically."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from capmerge._version import __version__
from capmerge.errors import MismatchError, UsageError
from capmerge.io.checkpoint import Checkpoint, PathLike, parse_dtype
from capmerge.io.names import name_filter, name_mismatch, normalise
from capmerge.io.open import open_checkpoint
from capmerge.io.writer import VECTOR_NAME, Output, SafetensorsFile, finish_files, parse_size
from capmerge.merge import compute
from capmerge.merge.engine import Job, Sink, run
from capmerge.merge.summary import Summary, start_progress


class _SizeShardedSink(Sink):
    """diff into a directory: fill ``capvector-N.safetensors`` files up to ``max_bytes`` as tensors arrive."""

    def __init__(self, out: Output, planned: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> None:
        super().__init__([])
        self.out, self.planned, self.max_bytes = out, planned, max_bytes
        self.index_of = {n: i for i, (n, _, _) in enumerate(planned)}

    def file_for(self, job: Job) -> SafetensorsFile:
        cur = self.files[-1] if self.files else None
        if cur is None or (cur.data_bytes and cur.data_bytes + job.out_nbytes > self.max_bytes):
            remaining = self.planned[self.index_of[job.name] :]
            cur = self.out.open_file(f"{VECTOR_NAME}-part{len(self.files) + 1}.safetensors", remaining)
            self.files.append(cur)
        return cur


def diff(
    base: PathLike | Checkpoint,
    aux: PathLike | Checkpoint,
    output: PathLike = "capvector.safetensors",
    *,
    dtype: str = "auto",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    allow_missing: bool = False,
    shard_size: int | str = "5GB",
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str = "auto",
    rename: Iterable[str] | str | None = None,
    key: str | None = None,
    trust_pickle: bool = False,
    dense: bool = False,
    adapter_base: PathLike | Checkpoint | None = None,
    command: str | None = None,
) -> Summary:
    """Write the capability vector τ = AUX − BASE, tensor by tensor (float32 math, rounded once).

    Args:
        base: the reference checkpoint (e.g. the plain-SFT model).
        aux: the checkpoint trained with auxiliary objectives.
        output: a ``.safetensors`` file, or a directory (sharded above ``shard_size``).
        dtype: ``auto`` (each tensor's dtype in AUX), ``float32``, ``bfloat16`` or ``float16``.
        include / exclude: regexes (``re.search``) on tensor names.
        allow_missing: skip and report names present on one side only instead of failing.
        shard_size: the largest shard of a directory output (``5GB``, ``500MB``, ``2GiB`` ...).
        force: replace an existing output (atomically).
        allow_nonfinite: keep NaN/Inf produced from finite inputs instead of failing.
        progress: called with (bytes processed so far, tensors finished in this step).
        device: ``auto`` (a CUDA GPU when there is one and triton imports), ``cpu``, ``cuda`` or ``cuda:N``.
        rename: ``REGEX=REPLACEMENT`` rules applied to the names of both inputs before pairing (wrapper prefixes
            such as ``module.`` are matched automatically and reported in ``notes``).
        key / trust_pickle: for PyTorch pickles (see :func:`capmerge.open_checkpoint`).
        dense / adapter_base: when BASE and AUX are both LoRA adapters, τ is written exactly in low-rank form
            unless ``dense``; ``adapter_base`` (the base model) is needed for ``modules_to_save`` weights that only
            one adapter holds.
        command: the command line that made the vector, recorded as ``capmerge.command`` in the header metadata
            (the CLI passes its own; the model card of ``capmerge push`` shows it).

    Returns:
        A :class:`Summary`. All-zero differences (frozen tensors) are left out of the file and listed in
        ``zero_tensors``; non-floating tensors are skipped and listed in ``skipped``.
    """
    from capmerge.kernels.device import resolve_device

    t0 = time.perf_counter()
    code = parse_dtype(dtype, allow_auto=True)
    max_shard = parse_size(shard_size)
    dev = resolve_device(device)
    keep = name_filter(include, exclude)
    ck_b = open_checkpoint(base, key=key, trust_pickle=trust_pickle)
    ck_a = open_checkpoint(aux, key=key, trust_pickle=trust_pickle)
    summary = Summary("diff", os.fspath(output))
    if _is_adapter(ck_b) or _is_adapter(ck_a):
        return _diff_adapters(ck_b, ck_a, summary, dense=dense, adapter_base=adapter_base, force=force, t0=t0,
                              opts={"key": key, "trust_pickle": trust_pickle})  # fmt: skip
    try:
        if adapter_base is not None:  # it would change nothing: say so instead of ignoring it
            raise UsageError(
                "--base is the base model of two LoRA adapters, but BASE and AUX are not adapters "
                "(τ = AUX − BASE needs no other model: drop --base)",
                os.fspath(adapter_base) if not isinstance(adapter_base, Checkpoint) else adapter_base.ref,
            )
        ck_b, (ck_a,), summary.notes, summary.tied = normalise(ck_b, [ck_a], rename=rename, labels=["BASE", "AUX"],
                                                               symmetric=True, models=(True, True))  # fmt: skip
        summary.notes[:0] = [n for ck in (ck_b, ck_a) for n in getattr(ck, "notes", [])]
        _pair_names(ck_b, ck_a, keep, allow_missing, summary)
        jobs = _diff_jobs(ck_b, ck_a, keep, code, dev, summary)
        out = Output(output, [ck_b, ck_a], force=force)
        try:
            planned = [(j.name, j.out_dtype, j.shape) for j in jobs]
            if out.single_file:
                sink = Sink([out.open_file(VECTOR_NAME + ".safetensors", planned)])
            else:
                sink = _SizeShardedSink(out, planned, max_shard)
            start_progress(progress, jobs)
            stats = run(jobs, sink, allow_nonfinite=allow_nonfinite, progress=progress, device=dev)
            meta = _vector_metadata(ck_b, ck_a, dtype, code, stats, summary, command)
            summary.files, summary.bytes_written = _finish_vector(out, sink, meta)
            out.commit()
        except BaseException:
            out.abort()
            raise
    finally:
        ck_a.close()
        ck_b.close()
    summary.outputs = [summary.output]
    summary.tensors_written = summary.tensors_changed = stats.tensors_written
    summary.zero_tensors = stats.tensors_dropped
    summary.tensors_unchanged = len(stats.tensors_dropped)
    if not summary.tensors_changed and summary.zero_tensors:
        summary.warnings.append(
            f"AUX equals BASE in every tensor compared: the vector is empty ({ck_b.ref}, {ck_a.ref})"
        )
    summary.bytes_read, summary.bytes_reread = stats.bytes_read, stats.bytes_reread
    summary.seconds = time.perf_counter() - t0
    return summary


def _pair_names(ck_b: Checkpoint, ck_a: Checkpoint, keep: Callable[[str], bool], allow_missing: bool,
                summary: Summary) -> None:  # fmt: skip
    """Names on one side only: an error (or skipped with --allow-missing); integer buffers only reported."""
    only_base = [n for n in ck_b.tensors if n not in ck_a.tensors and keep(n)]
    only_aux = [n for n in ck_a.tensors if n not in ck_b.tensors and keep(n)]
    # Integer/bool buffers never enter a vector, so one present on one side only (e.g. a position_ids buffer that
    # newer transformers no longer saves) is reported, not an error.
    for names, ck, side in ((only_base, ck_b, "BASE"), (only_aux, ck_a, "AUX")):
        for n in [n for n in names if not ck.tensors[n].is_float]:
            names.remove(n)
            summary.skipped[n] = f"non-floating ({ck.tensors[n].dtype}), only in {side}"
    if (only_base or only_aux) and not allow_missing:
        raise MismatchError(name_mismatch(only_base, "BASE", only_aux, "AUX") + "; use --allow-missing to skip them")
    for n in only_base:
        summary.skipped[n] = "only in BASE"
    for n in only_aux:
        summary.skipped[n] = "only in AUX"


def _diff_jobs(ck_b: Checkpoint, ck_a: Checkpoint, keep: Callable[[str], bool], code: str | None, dev: str,
               summary: Summary) -> list[Job]:  # fmt: skip
    """One difference job per floating tensor both sides hold, in AUX's order (all-zero results are dropped)."""
    jobs: list[Job] = []
    for name, ia in ck_a.tensors.items():
        if name not in ck_b.tensors or not keep(name):
            continue
        ib = ck_b.tensors[name]
        if ia.shape != ib.shape:
            raise MismatchError(f"shape mismatch: {list(ib.shape)} in BASE vs {list(ia.shape)} in AUX", name)
        if not (ia.is_float and ib.is_float):
            if ia.is_float or ib.is_float:
                raise MismatchError(f"dtype mismatch: {ib.dtype} in BASE vs {ia.dtype} in AUX", name)
            summary.skipped[name] = f"non-floating ({ia.dtype})"
            continue
        out_code = code or ia.dtype
        kernel = functools.partial(_diff_kernel, out_code, ia.dtype, ib.dtype, dev)
        jobs.append(Job(name, "compute", out_code, ia.shape, [(ck_a, ia), (ck_b, ib)], kernel=kernel, drop_zero=True))
    summary.tensors_skipped = len(summary.skipped)
    return jobs


def _vector_metadata(ck_b: Checkpoint, ck_a: Checkpoint, dtype: str, code: str | None, stats: Any, summary: Summary,
                     command: str | None) -> dict[str, str]:  # fmt: skip
    """The header's ``__metadata__`` of a capability vector: its kind, provenance and what was left out."""
    metadata = {
        "format": "pt",
        "capmerge.kind": "capability-vector",
        "capmerge.version": __version__,
        "capmerge.base": ck_b.ref,
        "capmerge.aux": ck_a.ref,
        "capmerge.base_fingerprint": ck_b.fingerprint(),
        "capmerge.aux_fingerprint": ck_a.fingerprint(),
        "capmerge.dtype": dtype if code is None else str(dtype),
        "capmerge.zero_tensors": str(len(stats.tensors_dropped)),
        "capmerge.skipped_tensors": str(summary.tensors_skipped),
    }
    if summary.tied:
        metadata["capmerge.tied"] = json.dumps(summary.tied)
    if command:
        metadata["capmerge.command"] = command
    return metadata


def _finish_vector(out: Output, sink: Sink, metadata: dict[str, str]) -> tuple[list[str], int]:
    """Name the vector's files (one file, or numbered shards and an index), drop empty parts, write the headers."""
    files = [f for f in sink.files if f.entries or len(sink.files) == 1]
    for f in sink.files:
        if f not in files:
            f.close()
            os.unlink(f.path)
    if out.single_file:
        return finish_files(out, [(os.path.basename(out.out), files[0])], metadata, None)
    if len(files) == 1:
        os.rename(files[0].path, out.path_for(VECTOR_NAME + ".safetensors"))
        files[0].path = str(out.path_for(VECTOR_NAME + ".safetensors"))
        return finish_files(out, [(VECTOR_NAME + ".safetensors", files[0])], metadata, None)
    named = []
    for i, f in enumerate(files):
        name = f"{VECTOR_NAME}-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(f.path, out.path_for(name))
        f.path = str(out.path_for(name))
        named.append((name, f))
    return finish_files(out, named, metadata, VECTOR_NAME + ".safetensors.index.json")


def diff_pairs(
    base: PathLike | Checkpoint,
    aux: PathLike | Checkpoint,
    *,
    rename: Iterable[str] | str | None = None,
    key: str | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """The pairing ``diff`` would use, from headers only: ``pairs`` (output name → [BASE name, AUX name]),
    ``only_base``, ``only_aux``, ``notes`` and ``tied``."""
    ck_b = open_checkpoint(base, key=key, trust_pickle=trust_pickle)
    ck_a = open_checkpoint(aux, key=key, trust_pickle=trust_pickle)
    ck_b, (ck_a,), notes, tied = normalise(
        ck_b, [ck_a], rename=rename, labels=["BASE", "AUX"], symmetric=True, models=(True, True)
    )
    return {
        "pairs": {n: [ck_b.tensors[n].name, ck_a.tensors[n].name] for n in ck_a.tensors if n in ck_b.tensors},
        "only_base": [n for n in ck_b.tensors if n not in ck_a.tensors],
        "only_aux": [n for n in ck_a.tensors if n not in ck_b.tensors],
        "notes": [n for ck in (ck_b, ck_a) for n in getattr(ck, "notes", [])] + notes,
        "tied": tied,
    }


def _is_adapter(ck: Checkpoint) -> bool:
    return getattr(ck, "source", None) == "peft-lora"


def _diff_adapters(
    ck_b: Checkpoint,
    ck_a: Checkpoint,
    summary: Summary,
    *,
    dense: bool,
    adapter_base: PathLike | Checkpoint | None,
    force: bool,
    t0: float,
    opts: dict[str, Any],
) -> Summary:
    """τ between two LoRA adapters of one base (see :func:`capmerge.io.lora.diff_adapters`)."""
    from capmerge.io.lora import diff_adapters

    if not (_is_adapter(ck_b) and _is_adapter(ck_a)):
        one = ck_b if _is_adapter(ck_b) else ck_a
        raise UsageError(
            "a LoRA adapter can only be diffed against another adapter (an adapter already is a vector: "
            "apply it with `capmerge apply BASE ADAPTER`)",
            one.ref,
        )
    base_ck = open_checkpoint(adapter_base, **opts) if adapter_base is not None else None
    try:
        res = diff_adapters(ck_b, ck_a, summary.output, dense=dense, base=base_ck, force=force)  # type: ignore[arg-type]
    finally:
        if base_ck is not None:
            base_ck.close()
    summary.files, summary.bytes_written, summary.bytes_read = res["files"], res["bytes_written"], res["bytes_read"]
    summary.outputs = [summary.output]
    summary.tensors_written = summary.tensors_changed = res["tensors_written"]
    summary.zero_tensors = res["zero_tensors"]
    summary.tensors_unchanged = len(summary.zero_tensors)
    form = "dense" if dense else f"low rank ({res['lowrank']} factor pairs, {res['dense']} dense)"
    summary.notes.append(f"LoRA adapters: τ = ΔW_aux − ΔW_sft written exactly in {form}")
    summary.seconds = time.perf_counter() - t0
    return summary


def _diff_kernel(
    out_code: str, a_code: str, b_code: str, device: str, views: list, outs: list, n: int, offset: int
) -> int:
    if device == "cpu":
        return compute.diff_block(outs[0], out_code, views[0], a_code, views[1], b_code, n)
    from capmerge.kernels.dispatch import diff_block

    return diff_block(device, outs[0], out_code, views[0], a_code, views[1], b_code, n)
