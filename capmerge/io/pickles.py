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

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            # The legacy (pre-1.6, non-zip) format cannot be memory-mapped: read it whole, still weights only.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "WeightsUnpickler" not in str(e) or _refusal_reason(str(e)).startswith("Unsupported operand"):
            why = _refusal_reason(str(e)) if "WeightsUnpickler" in str(e) else _first_line(e)
            raise CheckpointError(f"not a readable PyTorch checkpoint ({why})", str(path)) from None
        if not trust_pickle:
            reason = _refusal_reason(str(e)) or "the weights-only unpickler refused it"
            raise CheckpointError(
                f"pickle holds more than tensors and containers ({reason}); refused without running it. "
                "Pass --trust-pickle only if you trust the file: loading it runs code from it",
                str(path),
            ) from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(
            f"not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})", str(path)
        ) from None
    print(
        f"warning: loading {path} with --trust-pickle: the unpickler runs code from the file (trusted files only)",
        file=sys.stderr,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load pickle ({type(e).__name__}: {_first_line(e)})", str(path)) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _refusal_reason(msg: str) -> str:
    """The reason torch's weights-only unpickler gives (the first line after its ``WeightsUnpickler error:``)."""
    rest = msg.split("WeightsUnpickler error:", 1)[-1].strip()
    return (rest.splitlines() or [""])[0].split(". Please")[0].rstrip(".")[:200]


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def _flatten(d: Mapping[Any, Any], prefix: str, out: dict[str, Any], skipped: list[str]) -> None:
    for k, v in d.items():
        name = f"{prefix}{k}"
        if _is_tensor(v):
            out[name] = v
        elif isinstance(v, Mapping) and all(isinstance(kk, str) for kk in v):
            _flatten(v, name + ".", out, skipped)
        else:
            skipped.append(name)


def _has_tensors(v: Any) -> bool:
    if not isinstance(v, Mapping) or not v or not all(isinstance(k, str) for k in v):
        return False
    return any(_is_tensor(x) or _has_tensors(x) for x in v.values())


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
        elif not _has_tensors(node):
            raise CheckpointError(f"key {key!r} holds no tensors", where)
        else:
            notes.append(f"unwrapped key {key!r}")
        chosen: Mapping[str, Any] = node
    elif top_is_flat:
        chosen = obj
    else:
        candidates = [k for k, v in obj.items() if _has_tensors(v)]
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
    _flatten(chosen, "", tensors, skipped)
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
