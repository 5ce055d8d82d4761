"""The library API behind ``capmerge diff`` and ``capmerge apply``: plan the jobs, stream them, commit atomically."""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from capmerge import compute
from capmerge._version import __version__
from capmerge.checkpoint import DTYPE_NAMES, Checkpoint, open_checkpoint
from capmerge.engine import Job, Sink, read_total, run
from capmerge.errors import MismatchError, UsageError
from capmerge.names import normalise
from capmerge.writer import Output, SafetensorsFile

PathLike = str | os.PathLike[str]
VECTOR_NAME = "capvector"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """``5GB`` → 5·10⁹, ``2GiB`` → 2·2³⁰, ``500MB``, plain integers = bytes (as huggingface_hub does)."""
    if isinstance(size, bool):
        raise UsageError(f"invalid size {size!r} (use e.g. 5GB, 500MB, 2GiB)")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise UsageError(f"invalid size {size!r} (use e.g. 5GB, 500MB, 2GiB)")
        scaled = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]  # inf for a numeral too long for a float
        n = int(scaled) if scaled < 2**63 else 2**63
    if n >= 2**63:
        shown = repr(size) if len(str(size)) <= 40 else f"{str(size)[:40]!r}… ({len(str(size))} characters)"
        raise UsageError(f"size too large: {shown} (at most 2**63 - 1 bytes)")
    if n <= 0:
        raise UsageError(f"size must be positive: {size!r}")
    return n


def parse_dtype(dtype: str | None, *, allow_auto: bool) -> str | None:
    """``auto``/None → None (keep each tensor's dtype); ``bfloat16`` etc. → safetensors code."""
    if dtype is None or (allow_auto and dtype == "auto"):
        return None
    code = DTYPE_NAMES.get(str(dtype).lower().replace("torch.", ""))
    if code is None:
        choices = ("auto, " if allow_auto else "") + "float32, bfloat16, float16"
        raise UsageError(f"invalid dtype {dtype!r} (choose from {choices})")
    return code


def _compile(patterns: Iterable[str] | str | None, what: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise UsageError(f"invalid {what} regex {p!r}: {e}") from None
    return out


def name_filter(include: Iterable[str] | str | None, exclude: Iterable[str] | str | None) -> Callable[[str], bool]:
    """``re.search`` semantics: a name enters when it matches any include (or there is none) and no exclude."""
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")
    return lambda n: (not inc or any(p.search(n) for p in inc)) and not any(p.search(n) for p in exc)


@dataclass
class Summary:
    """What a diff/apply did. ``to_dict()`` is what ``--json`` prints."""

    command: str
    output: str
    files: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    tensors_written: int = 0
    tensors_changed: int = 0
    tensors_unchanged: int = 0
    tensors_skipped: int = 0
    zero_tensors: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    files_skipped: dict[str, str] = field(default_factory=dict)  # side files of BASE not copied, and why
    bytes_read: int = 0  # tensor data read from the inputs, each tensor once, as stored (what the progress bar counts)
    bytes_reread: int = 0  # read a second time by the pruning passes (ties, dare, breadcrumbs, magnitude)
    bytes_written: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # renames, prefix normalisation, tied weights, unwrapped pickles
    warnings: list[str] = field(default_factory=list)  # options that had no effect (e.g. an unmatched override)
    tied: dict[str, str] = field(default_factory=dict)  # alias → the tensor it shares (written once)

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gb_per_s"] = round(self.gb_per_s, 3)
        d["seconds"] = round(self.seconds, 4)
        return d

    def line(self) -> str:
        """A one-line human summary (what the CLI prints on stderr)."""
        parts = [f"{self.tensors_changed} tensors changed"]
        if self.command == "diff":
            parts.append(f"{len(self.zero_tensors)} unchanged (zero, left out)")
        else:
            parts.append(f"{self.tensors_unchanged} copied unchanged")
        parts.append(f"{self.tensors_skipped} skipped")
        gb = 1e9
        reread = f" (+{self.bytes_reread / gb:.2f} GB re-read by the pruning pass)" if self.bytes_reread else ""
        return (
            f"{self.command}: {', '.join(parts)}; read {self.bytes_read / gb:.2f} GB{reread}, wrote "
            f"{self.bytes_written / gb:.2f} GB in {self.seconds:.2f} s ({self.gb_per_s:.2f} GB/s) -> {self.output}"
        )


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


def _start_progress(progress: Any, jobs: list[Job]) -> None:
    if hasattr(progress, "set_total"):
        progress.set_total(read_total(jobs), len(jobs))  # the same count as the summary's bytes_read


def _refs(ck: Checkpoint) -> dict[str, str]:
    return {"ref": ck.ref, "fingerprint": ck.fingerprint()}


def _finish_files(
    out: Output, files: list[tuple[str, SafetensorsFile]], metadata: dict[str, str], index_name: str | None
) -> tuple[list[str], int]:
    """Write headers, then the index when there are several files. Returns (file names, bytes written)."""
    names, written, weight_map, total = [], 0, {}, 0
    for name, f in files:
        for e in f.entries:
            weight_map[e.name] = name
            total += e.end - e.begin
        written += f.finish(metadata)
        names.append(name)
    if index_name is not None:
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
        text = json.dumps(index, indent=2) + "\n"
        out.write_text(index_name, text)
        written += len(text.encode())
        names.append(index_name)
    return names, written


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
    if adapter_base is not None:  # it would change nothing: say so instead of ignoring it
        ck_b.close()
        ck_a.close()
        raise UsageError(
            "--base is the base model of two LoRA adapters, but BASE and AUX are not adapters "
            "(τ = AUX − BASE needs no other model: drop --base)",
            os.fspath(adapter_base) if not isinstance(adapter_base, Checkpoint) else adapter_base.ref,
        )
    ck_b, (ck_a,), summary.notes, summary.tied = normalise(ck_b, [ck_a], rename=rename, labels=["BASE", "AUX"],
                                                           symmetric=True)  # fmt: skip
    summary.notes[:0] = [n for ck in (ck_b, ck_a) for n in getattr(ck, "notes", [])]
    only_base = [n for n in ck_b.tensors if n not in ck_a.tensors and keep(n)]
    only_aux = [n for n in ck_a.tensors if n not in ck_b.tensors and keep(n)]
    # Integer/bool buffers never enter a vector, so one present on one side only (e.g. a position_ids buffer that
    # newer transformers no longer saves) is reported, not an error.
    for names, ck, side in ((only_base, ck_b, "BASE"), (only_aux, ck_a, "AUX")):
        for n in [n for n in names if not ck.tensors[n].is_float]:
            names.remove(n)
            summary.skipped[n] = f"non-floating ({ck.tensors[n].dtype}), only in {side}"
    if (only_base or only_aux) and not allow_missing:
        raise MismatchError(_name_mismatch(only_base, "BASE", only_aux, "AUX") + "; use --allow-missing to skip them")
    for n in only_base:
        summary.skipped[n] = "only in BASE"
    for n in only_aux:
        summary.skipped[n] = "only in AUX"
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
    out = Output(output, [ck_b, ck_a], force=force)
    try:
        planned = [(j.name, j.out_dtype, j.shape) for j in jobs]
        if out.single_file:
            sink = Sink([out.open_file(VECTOR_NAME + ".safetensors", planned)])
        else:
            sink = _SizeShardedSink(out, planned, max_shard)
        _start_progress(progress, jobs)
        stats = run(jobs, sink, allow_nonfinite=allow_nonfinite, progress=progress, device=dev)
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
        files = [f for f in sink.files if f.entries or len(sink.files) == 1]
        for f in sink.files:
            if f not in files:
                f.close()
                os.unlink(f.path)
        if out.single_file:
            named = [(os.path.basename(out.out), files[0])]
            index_name = None
        elif len(files) == 1:
            os.rename(files[0].path, out.path_for(VECTOR_NAME + ".safetensors"))
            files[0].path = str(out.path_for(VECTOR_NAME + ".safetensors"))
            named = [(VECTOR_NAME + ".safetensors", files[0])]
            index_name = None
        else:
            named = []
            for i, f in enumerate(files):
                name = f"{VECTOR_NAME}-{i + 1:05d}-of-{len(files):05d}.safetensors"
                os.rename(f.path, out.path_for(name))
                f.path = str(out.path_for(name))
                named.append((name, f))
            index_name = VECTOR_NAME + ".safetensors.index.json"
        summary.files, summary.bytes_written = _finish_files(out, named, metadata, index_name)
        out.commit()
    except BaseException:
        out.abort()
        raise
    finally:
        ck_a.close()
        ck_b.close()
    summary.outputs = [summary.output]
    summary.tensors_written = stats.tensors_written
    summary.tensors_changed = stats.tensors_written
    summary.zero_tensors = stats.tensors_dropped
    summary.tensors_unchanged = len(stats.tensors_dropped)
    summary.bytes_read, summary.bytes_reread = stats.bytes_read, stats.bytes_reread
    summary.seconds = time.perf_counter() - t0
    return summary


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
    ck_b, (ck_a,), notes, tied = normalise(ck_b, [ck_a], rename=rename, labels=["BASE", "AUX"], symmetric=True)
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
    """τ between two LoRA adapters of one base (see :func:`capmerge.lora.diff_adapters`)."""
    from capmerge.lora import diff_adapters

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
    return compute.diff_block(outs[0], out_code, views[0], a_code, views[1], b_code, n, device)


def _name_mismatch(a: list[str], a_label: str, b: list[str], b_label: str) -> str:
    parts = []
    for names, label in ((a, a_label), (b, b_label)):
        if names:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            parts.append(f"{len(names)} only in {label} ({shown})")
    return "tensor names differ: " + "; ".join(parts)
