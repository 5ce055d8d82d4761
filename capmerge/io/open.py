"""Open any checkpoint reference: the one dispatcher from a path (or hub id) to the format that reads it.

A ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory holding one (:mod:`capmerge.io.checkpoint`);
PyTorch pickles (:mod:`capmerge.io.pickles`); LoRA adapters (:mod:`capmerge.io.lora`); compressed vectors
(:mod:`capmerge.io.compression`); hub references through resolvers (:mod:`capmerge.io.hub`, and any added with
:func:`register_resolver`). The formats never import this module: it sits above them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capmerge.errors import AmbiguousCheckpointError, CheckpointError, CheckpointNotFoundError
from capmerge.io.checkpoint import (
    KNOWN_SINGLE_NAMES,
    PICKLE_SUFFIXES,
    VECTOR_FORMAT_KEY,
    WEIGHT_SUFFIXES,
    Checkpoint,
    open_index,
    read_header,
    require_regular_file,
)

Resolver = Callable[[str], "str | None"]


def _hub_resolver(ref: str) -> str | None:
    """Hub references (``hf://org/name[@rev][/sub]``, or a bare ``org/name``): fetched and verified first."""
    from capmerge.io import hub

    return hub.resolve(ref) if hub.parse_ref(ref) is not None else None


_RESOLVERS: list[Resolver] = [_hub_resolver]


def register_resolver(resolver: Resolver) -> None:
    """Add a resolver that maps a non-path reference (e.g. a hub id) to a local path, or returns None."""
    _RESOLVERS.append(resolver)


def open_checkpoint(
    ref: str | os.PathLike[str] | Checkpoint,
    *,
    key: str | None = None,
    trust_pickle: bool = False,
    headers_only: bool = False,
) -> Checkpoint:
    """Open a checkpoint reference as a lazy :class:`Checkpoint` (headers only).

    Args:
        ref: a ``.safetensors`` file, a ``*.safetensors.index.json``, a ``.bin``/``.pt``/``.pth`` state dict, a
            ``pytorch_model.bin.index.json``, a directory holding one of those, a PEFT LoRA adapter directory, a
            compressed (low-rank / sparse) vector, or anything a registered resolver maps to one of these.
        key: the entry of a nested pickle that holds the state dict (``state_dict``, ``model`` ...); without it a
            nested state dict is unwrapped when only one entry holds tensors.
        trust_pickle: load pickles that need more than tensors (runs code from the file; prints a warning).
        headers_only: the caller reads no tensor data; a hub reference is then opened from ranged reads of its
            safetensors headers where the Hub allows them (nothing downloaded), else fetched as usual.

    Compressed vectors and LoRA adapters open as views of DENSE tensors (each built when read); ``kind`` and
    ``storage(name)`` tell how they are stored.
    """
    if isinstance(ref, Checkpoint):
        return ref
    ref_s = os.fspath(ref)
    path = Path(ref_s)
    if not path.exists():
        if headers_only:
            from capmerge.io import hub

            remote = hub.open_headers(ref_s) if hub.parse_ref(ref_s) is not None else None
            if remote is not None:
                return _vector_view(remote)
        for resolver in _RESOLVERS:
            local = resolver(ref_s)
            if local is not None:
                path = Path(local)
                break
        else:
            model, plus, lora = ref_s.partition("+")
            if plus and Path(model).exists() and Path(lora).exists():
                raise CheckpointNotFoundError(
                    "no such file or directory: MODEL+LORA is mergekit's form, read by `capmerge merge` and mergekit "
                    "configurations; here pass the adapter itself (`capmerge apply MODEL ADAPTER` adds its ΔW, "
                    "`capmerge diff ADAPTER1 ADAPTER2` gives the difference of two)", ref_s)  # fmt: skip
            raise CheckpointNotFoundError("no such file or directory", ref_s)
    opts = {"key": key, "trust_pickle": trust_pickle}
    if path.is_dir():
        return _vector_view(_open_dir(ref_s, path, opts))
    require_regular_file(path)
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return _vector_view(open_index(ref_s, path))
    if name.endswith(".bin.index.json") or name.endswith(".pt.index.json"):
        from capmerge.io.pickles import open_pickle_index

        return open_pickle_index(ref_s, path, **opts)
    if name.endswith(PICKLE_SUFFIXES):
        from capmerge.io.pickles import open_pickle

        return open_pickle(ref_s, path, **opts)
    hdr = read_header(path)
    return _vector_view(Checkpoint(ref_s, [str(path)], hdr.tensors, hdr.metadata, root=None, headers=[hdr]))


def _vector_view(ck: Checkpoint) -> Checkpoint:
    """Compressed vectors (header key ``capmerge.vector_format``) open as a lazy view of their dense tensors."""
    if ck.metadata.get(VECTOR_FORMAT_KEY, "dense") == "dense":
        return ck
    from capmerge.io.compression import open_compressed

    return open_compressed(ck)


def _open_dir(ref: str, path: Path, opts: dict[str, Any]) -> Checkpoint:
    # Everything but subdirectories: a FIFO or device under a weight name is refused by name when opened, not skipped.
    files = sorted(p.name for p in path.iterdir() if not p.is_dir())
    if "adapter_config.json" in files:
        from capmerge.io.lora import open_adapter

        return open_adapter(ref, path)
    indexes = [f for f in files if f.endswith(".safetensors.index.json")]
    singles = [f for f in files if f.endswith(".safetensors")]
    if len(indexes) > 1:
        raise AmbiguousCheckpointError(
            f"directory holds several weight sets ({', '.join(indexes)}); pass the one to use", ref
        )
    if indexes:
        sharded = open_index(ref, path / indexes[0])
        loose = [f for f in singles if str(path / f) not in sharded.files]
        if loose:
            raise AmbiguousCheckpointError(
                f"directory holds several weight sets ({', '.join([indexes[0], *loose])}); pass the one to use", ref
            )
        sharded.root = str(path)
        return sharded
    known = [f for f in singles if f in KNOWN_SINGLE_NAMES]
    if len(singles) == 1 and known:
        hdr = read_header(path / singles[0])
        return Checkpoint(ref, [hdr.path], hdr.tensors, hdr.metadata, root=str(path), headers=[hdr])
    if singles:
        raise AmbiguousCheckpointError(
            f"directory holds several candidate weight files ({', '.join(singles)}); pass the file to use", ref
        )
    pickle_indexes = [f for f in files if f.endswith((".bin.index.json", ".pt.index.json"))]
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if len(pickle_indexes) == 1:
        from capmerge.io.pickles import open_pickle_index

        ck: Checkpoint = open_pickle_index(ref, path / pickle_indexes[0], **opts)
        ck.root = str(path)
        return ck
    if pickle_indexes or len(pickles) > 1:
        shown = ", ".join((pickle_indexes or pickles)[:5])
        raise AmbiguousCheckpointError(f"directory holds several weight sets ({shown}); pass the one to use", ref)
    if pickles:
        from capmerge.io.pickles import open_pickle

        ck = open_pickle(ref, path / pickles[0], **opts)
        ck.root = str(path)
        return ck
    others = [f for f in files if f.endswith(WEIGHT_SUFFIXES)]
    if others:
        raise CheckpointError(f"no supported weights in directory (found {', '.join(others[:5])})", ref)
    raise CheckpointNotFoundError(
        "no weights in directory (expected model.safetensors, *.safetensors.index.json, pytorch_model.bin or an "
        "adapter_config.json)",
        ref,
    )
