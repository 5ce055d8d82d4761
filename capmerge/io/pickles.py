"""PyTorch state dicts (``.bin``/``.pt``/``.pth``, ``pytorch_model.bin.index.json``) as lazy checkpoints.

Files are loaded with ``torch.load(weights_only=True, mmap=True)``: the unpickler only builds tensors and plain
containers (no code from the file runs), and tensor data stays in the page cache until a tensor is read. A pickle
that needs more than that is refused unless ``trust_pickle`` is set (a warning is printed: that runs code from the
file). Nested state dicts (``{"state_dict": {...}}``, ``{"model": {...}}``) are unwrapped by ``key`` or, when only
one entry holds tensors, automatically.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capmerge.errors import CheckpointError
from capmerge.io.checkpoint import TensorInfo, read_weight_map, require_regular_file
from capmerge.io.lazy import LazyCheckpoint, digest_of


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                # The legacy (pre-1.6, non-zip) format cannot be memory-mapped: read it whole, still weights only.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused, reason = refusal_reason(str(e))
        if not refused:
            raise CheckpointError(f"not a readable PyTorch checkpoint ({reason})", str(path)) from None
        if not trust_pickle:
            raise CheckpointError(
                f"pickle holds more than tensors and containers ({reason}); refused without running it. "
                "Pass --trust-pickle only if you trust the file: loading it runs code from it",
                str(path),
            ) from None
    except RecursionError:
        raise CheckpointError("not a readable PyTorch checkpoint (nested too deeply)", str(path)) from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(f"not a readable PyTorch checkpoint ({_describe(e)})", str(path)) from None
    print(
        f"warning: loading {path} with --trust-pickle: the unpickler runs code from the file (trusted files only)",
        file=sys.stderr,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load pickle ({_describe(e)})", str(path)) from None


def _describe(e: BaseException) -> str:
    """An exception as a short phrase: its first line (cut at 200 characters), else what kind of failure it is."""
    first = (str(e).strip().splitlines() or [""])[0].strip()
    if len(first) > 200:
        first = first[:199] + "…"
    if isinstance(e, EOFError):
        return f"unexpected end of file{': ' + first if first else ''}"
    return first or f"{type(e).__name__} without a message"


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1) ", "(2) ")


def refusal_reason(message: str) -> tuple[bool, str]:
    """What torch's weights-only unpickler objected to, in one line, from its ``UnpicklingError`` text.

    The text changes between torch versions (2.4: ``WeightsUnpickler error: Unsupported global: GLOBAL
    posix.system was not an allowed global by default. Please use ...``; 2.6+ adds paragraphs of advice first and,
    for modules it blocks outright, says ``Trying to load unsupported GLOBAL posix.system whose module posix is
    blocked``). Returns ``(refused, reason)``: ``refused`` is True when the pickle is readable but needs more than
    tensors and containers (a global: a class or function), False when it is not a pickle torch can read.
    """
    import pickletools
    import re

    glob = re.search(r"GLOBAL ([A-Za-z_][\w.]*\w)", message)
    if glob:
        blocked = re.search(r"whose module ([\w.]+\w) is blocked", message)
        why = f", whose module {blocked.group(1)} is blocked" if blocked else ""
        return True, f"Unsupported global: GLOBAL {glob.group(1)}{why}"
    op = re.search(r"Unsupported operand (\d+)", message)
    if op:
        code = int(op.group(1)) if len(op.group(1)) < 4 else -1
        names = {ord(o.code): o.name for o in pickletools.opcodes}
        name = f" ({names[code]})" if code in names else ""
        return False, f"pickle opcode {op.group(1)}{name} is not supported by the weights-only unpickler"
    detail = message.split("WeightsUnpickler error:", 1)
    if len(detail) == 2:
        rest = " ".join(detail[1].split())
        return True, (rest.split(". Please")[0].rstrip(".")[:200] or "the weights-only unpickler refused it")
    for line in message.splitlines():
        line = line.strip()
        if line and not line.startswith(_BOILERPLATE):
            return False, line[:200]
    return False, "the weights-only unpickler refused it"


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


MAX_NESTING = 64  # state dicts nest a few levels ({"model": {"state_dict": {...}}}); deeper is not a checkpoint


def _too_deep(where: str) -> CheckpointError:
    return CheckpointError(f"state dict nested more than {MAX_NESTING} levels deep", where)


def _flatten(d: Mapping[Any, Any], prefix: str, out: dict[str, Any], skipped: list[str], where: str, depth: int = 0
             ) -> None:  # fmt: skip
    if depth > MAX_NESTING:
        raise _too_deep(where)
    for k, v in d.items():
        name = f"{prefix}{k}"
        if _is_tensor(v):
            out[name] = v
        elif isinstance(v, Mapping) and all(isinstance(kk, str) for kk in v):
            _flatten(v, name + ".", out, skipped, where, depth + 1)
        else:
            skipped.append(name)


def _has_tensors(v: Any, where: str, depth: int = 0) -> bool:
    if not isinstance(v, Mapping) or not v or not all(isinstance(k, str) for k in v):
        return False
    if depth > MAX_NESTING:
        raise _too_deep(where)
    return any(_is_tensor(x) or _has_tensors(x, where, depth + 1) for x in v.values())


def select_state_dict(obj: Any, key: str | None, where: str) -> tuple[dict[str, Any], list[str]]:
    """The flat name → tensor dict inside a loaded pickle, and notes on what was unwrapped or skipped."""
    notes: list[str] = []
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"pickle holds a {type(obj).__name__}, not a state dict (a dict of tensors)", where)
    top_is_flat = bool(obj) and all(_is_tensor(v) for v in obj.values())
    if key is not None:
        node: Any = obj
        if key in obj:
            node = obj[key]
        else:
            for part in key.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            if not top_is_flat:
                keys = ", ".join(list(map(str, obj))[:10])
                raise CheckpointError(f"no key {key!r} in the pickle (top-level keys: {keys})", where)
            notes.append(f"no key {key!r}: the file is already a flat state dict")
            node = obj
        elif not _has_tensors(node, where):
            raise CheckpointError(f"key {key!r} holds no tensors", where)
        else:
            notes.append(f"unwrapped key {key!r}")
        chosen: Mapping[str, Any] = node
    elif top_is_flat:
        chosen = obj
    else:
        candidates = [k for k, v in obj.items() if _has_tensors(v, where)]
        loose = [k for k, v in obj.items() if _is_tensor(v)]
        if len(candidates) == 1 and not loose:
            chosen = obj[candidates[0]]
            notes.append(f"unwrapped key {candidates[0]!r}")
        elif not candidates and not loose:
            raise CheckpointError("no tensors in the pickle", where)
        elif not candidates:
            chosen = obj
        else:
            shown = ", ".join(repr(c) for c in ([*candidates, "<top level>"] if loose else candidates))
            raise CheckpointError(f"several entries hold tensors ({shown}); choose one with --key", where)
    tensors: dict[str, Any] = {}
    skipped: list[str] = []
    _flatten(chosen, "", tensors, skipped, where)
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        notes.append(f"left out {len(skipped)} non-tensor entries ({shown})")
    if not tensors:
        raise CheckpointError("no tensors in the state dict", where)
    return tensors, notes


def _layout(path: Path) -> object:
    """Cheap, data-dependent facts for the fingerprint: the CRC-32 of every zip record (torch.save's format)."""
    try:
        with zipfile.ZipFile(path) as z:
            return [(i.filename.split("/", 1)[-1], i.CRC, i.file_size) for i in z.infolist()]
    except (zipfile.BadZipFile, OSError):
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)


def _infos_of(tensors: dict[str, Any], path: str, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    from capmerge._torch import SAFETENSORS_CODES

    infos: dict[str, TensorInfo] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in tensors.items():
        code = SAFETENSORS_CODES.get(t.dtype)
        if code is None or t.is_quantized or t.is_sparse:
            raise CheckpointError(f"unsupported tensor type {t.dtype} of tensor {name}", where)
        infos[name] = TensorInfo(name, code, tuple(t.shape), path, 0, t.numel() * t.element_size())
        if t.numel():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident in seen:
                tied[name] = seen[ident]
            else:
                seen[ident] = name
    return infos, tied


def open_pickle(ref: str, path: Path, *, key: str | None = None, trust_pickle: bool = False) -> LazyCheckpoint:
    """Open one ``.bin``/``.pt``/``.pth`` state dict as a lazy checkpoint (no tensor data read)."""
    if require_regular_file(path).st_size == 0:
        raise CheckpointError("empty file, not a PyTorch checkpoint", str(path))
    obj = _torch_load(path, trust_pickle)
    tensors, notes = select_state_dict(obj, key, str(path))
    infos, tied = _infos_of(tensors, str(path), str(path))
    loaders = {name: (lambda t=t: t) for name, t in tensors.items()}
    return LazyCheckpoint(
        ref,
        [str(path)],
        infos,
        {"format": "pt"},
        loaders=loaders,
        source="pytorch",
        digest=digest_of(path.name, key, _layout(path), [(n, i.dtype, i.shape) for n, i in infos.items()]),
        tied=tied,
        notes=notes,
    )


def open_pickle_index(ref: str, index: Path, *, key: str | None = None, trust_pickle: bool = False) -> LazyCheckpoint:
    """Open a sharded ``pytorch_model.bin.index.json`` layout (each shard loaded lazily)."""
    wmap = read_weight_map(index)
    infos: dict[str, TensorInfo] = {}
    loaders: dict[str, Any] = {}
    tied: dict[str, str] = {}
    notes: list[str] = []
    layouts = []
    files = []
    for shard in sorted(set(wmap.values())):
        p = index.parent / shard
        if not p.exists():
            raise CheckpointError(f"index names a shard that does not exist: {shard}", str(index))
        part = open_pickle(os.fspath(p), p, key=key, trust_pickle=trust_pickle)
        files.append(str(p))
        layouts.append((shard, part.digest))
        notes += [f"{shard}: {n}" for n in part.notes]
        for name, info in part.tensors.items():
            if wmap.get(name) == shard:
                infos[name], loaders[name] = info, part.loaders[name]
                if name in part.tied:
                    tied[name] = part.tied[name]
    for name, shard in wmap.items():
        if name not in infos:
            raise CheckpointError(f"tensor {name} is missing from its shard {shard}", str(index.parent / shard))
    return LazyCheckpoint(
        ref,
        files,
        infos,
        {"format": "pt"},
        root=str(index.parent),
        index_path=str(index),
        loaders=loaders,
        source="pytorch",
        digest=digest_of(layouts),
        tied=tied,
        notes=notes,
    )
