"""A checkpoint whose tensors are produced by code: PyTorch pickles, LoRA adapters, compressed vectors.

:class:`LazyCheckpoint` has the same interface as a safetensors :class:`~capmerge.io.checkpoint.Checkpoint` (names,
shapes, dtypes, ``read_into``/``read_tensor``), so the engine, ``diff``, ``apply`` and every merge method work on it
unchanged. A tensor comes either from a *loader*, which returns it whole as a CPU tensor (an mmap-backed view of a
pickle), built when first read and kept until the same thread reads another one; or from a *block source* (B·A of a
low-rank tensor, the scattered entries of a sparse one), which produces any range of elements at most
:data:`BLOCK_ELEMS` at a time: ``read_into`` never builds more than a block, whatever the declared shape.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from capmerge.errors import CheckpointError
from capmerge.io.checkpoint import Checkpoint, TensorInfo

Loader = Callable[[], Any]  # () -> torch.Tensor with the shape and dtype of its TensorInfo
# Elements per block: the streaming engine's CPU block (1 MiB of bf16 per input, the buffer pool stays in L3), and
# the most a block source builds at once. Block sources cut a tensor into tiles at fixed element positions derived
# from it, so every element is computed the same way whoever reads it, in whatever ranges.
BLOCK_ELEMS = 1 << 19


class BlockSource(Protocol):
    """A tensor produced a range of elements at a time (flat, row-major), from what its file stores."""

    overflow: bool  # set once a block held NaN/Inf although every stored part is finite

    def fill(self, start: int, end: int, out: Any) -> None:
        """Write elements [start, end) (at most BLOCK_ELEMS of them) into ``out``, a 1-D tensor of the tensor's
        dtype and ``end - start`` elements."""
        ...


Opener = Callable[[], BlockSource]  # () -> a block source (reads and checks the stored parts once)


@dataclass
class LazyCheckpoint(Checkpoint):
    """A :class:`Checkpoint` whose tensors come from loaders instead of byte ranges of safetensors files.

    Attributes:
        loaders: tensor name → a function returning the tensor (CPU, any layout; made contiguous here).
        blocks: tensor name → an opener of its :class:`BlockSource` (instead of a loader).
        vector_kind: ``dense`` | ``lowrank`` | ``sparse`` (what :attr:`kind` reports).
        storages: tensor name → how it is stored (see :meth:`Checkpoint.storage`); missing names are dense.
        source: where the tensors come from: ``pytorch`` (a pickle), ``peft-lora``, ``compressed``.
        digest: the fingerprint (computed by the opener from cheap, data-dependent facts).
        tied: alias name → the name whose storage it shares (pickles saved with tied weights).
        notes: what the opener did that the user should know (unwrapped keys, skipped entries), for summaries.
        overflowed: names of block-sourced tensors in which a block read so far held NaN/Inf although every stored
            part is finite (the engine then fails as for a dense result that overflows, unless allowed).
    """

    loaders: dict[str, Loader] = field(default_factory=dict, repr=False)
    blocks: dict[str, Opener] = field(default_factory=dict, repr=False)
    vector_kind: str = "dense"
    storages: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    source: str = "pytorch"
    digest: str = ""
    tied: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    keep_alive: list[Any] = field(default_factory=list, repr=False)
    overflowed: set[str] = field(default_factory=set, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    direct = False  # no byte range in a file to copy from: the engine copies through read_into

    @property
    def kind(self) -> str:
        return self.vector_kind

    def storage(self, name: str) -> dict[str, Any]:
        info = self._info(name)
        return dict(self.storages.get(info.name) or {"storage": "dense", "nbytes": info.nbytes, "dtype": info.dtype})

    def fingerprint(self) -> str:
        return self.digest or super().fingerprint()

    def _source(self, info: TensorInfo) -> BlockSource:
        """The block source of ``info``, opened at most once per thread while it is being read."""
        local = self._local
        if getattr(local, "name", None) == info.name and getattr(local, "source", None) is not None:
            return local.source
        local.name, local.tensor, local.source = None, None, None  # release the previous one first
        local.source = self.blocks[info.name]()
        local.name = info.name
        return local.source

    def _read_blocks(self, info: TensorInfo, first: int, last: int, out: Any) -> None:
        """Elements [first, last) of a block-sourced tensor into ``out`` (1-D, its dtype), block by block."""
        src = self._source(info)
        for s in range(first, last, BLOCK_ELEMS):
            e = min(last, s + BLOCK_ELEMS)
            src.fill(s, e, out[s - first : e - first])
        if src.overflow:
            self.overflowed.add(info.name)

    def tensor(self, info: TensorInfo) -> Any:
        """The tensor of ``info``, contiguous, built at most once per thread while it is being read."""
        import torch

        from capmerge._torch import torch_dtype

        local = self._local
        if getattr(local, "name", None) == info.name and getattr(local, "tensor", None) is not None:
            return local.tensor
        if info.name in self.blocks:  # the whole tensor, from the same blocks read_into reads
            t = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
            if t.numel():
                self._read_blocks(info, 0, t.numel(), t.reshape(-1))
            local.name, local.tensor, local.source = info.name, t, None
            return t
        local.name, local.tensor, local.source = None, None, None  # release the previous one before the next
        try:
            loader = self.loaders[info.name]
        except KeyError:
            raise CheckpointError(f"no tensor named {info.name}", self.ref) from None
        t = loader().contiguous()
        if tuple(t.shape) != info.shape:
            raise CheckpointError(
                f"tensor {info.name} has shape {list(t.shape)}, expected {list(info.shape)}", self.ref
            )
        local.name, local.tensor = info.name, t
        return t

    def read_into(self, info: TensorInfo, byte_offset: int, buf: memoryview) -> None:
        import torch

        from capmerge._torch import as_tensor, torch_dtype

        n = len(buf)
        if byte_offset < 0 or byte_offset + n > info.nbytes:
            raise CheckpointError(f"read past the end of tensor {info.name}", self.ref)
        if info.name in self.blocks:  # only the blocks covering the range are built
            if n:
                isz = info.itemsize
                first, last = byte_offset // isz, -(-(byte_offset + n) // isz)
                if first * isz == byte_offset and last * isz == byte_offset + n:
                    self._read_blocks(info, first, last, as_tensor(buf, info.dtype))
                else:  # a range that cuts elements: build the whole elements, copy the bytes asked for
                    tmp = torch.empty(last - first, dtype=torch_dtype(info.dtype))
                    self._read_blocks(info, first, last, tmp)
                    skip = byte_offset - first * isz
                    as_tensor(buf, "U8").copy_(tmp.view(torch.uint8)[skip : skip + n])
            return
        t = self.tensor(info)
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if n:
            as_tensor(buf, "U8").copy_(flat[byte_offset : byte_offset + n])

    def read_tensor(self, name: str) -> Any:
        info = self._info(name)
        t = self.tensor(info)
        self._local.name, self._local.tensor, self._local.source = None, None, None  # the caller owns it now
        return t

    def close(self) -> None:
        self._local = threading.local()
        super().close()


def digest_of(*parts: object) -> str:
    """A fingerprint over cheap facts (file names, sizes, CRCs, tensor layouts)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()
