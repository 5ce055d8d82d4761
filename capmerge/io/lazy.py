"""A checkpoint whose tensors are produced by code: PyTorch pickles, LoRA adapters, compressed vectors.

:class:`LazyCheckpoint` has the same interface as a safetensors :class:`~capmerge.io.checkpoint.Checkpoint` (names,
shapes, dtypes, ``read_into``/``read_tensor``), so the engine, ``diff``, ``apply`` and every merge method work on it
unchanged. Each tensor has a *loader* that returns it as a CPU tensor (an mmap-backed view of a pickle, one B·A
product of a low-rank vector, one scattered sparse tensor). A tensor is built when it is first read and kept until
the same thread reads another one: memory holds at most one materialised tensor per thread, whatever the model size.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capmerge.errors import CheckpointError
from capmerge.io.checkpoint import Checkpoint, TensorInfo

Loader = Callable[[], Any]  # () -> torch.Tensor with the shape and dtype of its TensorInfo


@dataclass
class LazyCheckpoint(Checkpoint):
    """A :class:`Checkpoint` whose tensors come from loaders instead of byte ranges of safetensors files.

    Attributes:
        loaders: tensor name → a function returning the tensor (CPU, any layout; made contiguous here).
        vector_kind: ``dense`` | ``lowrank`` | ``sparse`` (what :attr:`kind` reports).
        storages: tensor name → how it is stored (see :meth:`Checkpoint.storage`); missing names are dense.
        source: where the tensors come from: ``pytorch`` (a pickle), ``peft-lora``, ``compressed``.
        digest: the fingerprint (computed by the opener from cheap, data-dependent facts).
        tied: alias name → the name whose storage it shares (pickles saved with tied weights).
        notes: what the opener did that the user should know (unwrapped keys, skipped entries), for summaries.
    """

    loaders: dict[str, Loader] = field(default_factory=dict, repr=False)
    vector_kind: str = "dense"
    storages: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    source: str = "pytorch"
    digest: str = ""
    tied: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    keep_alive: list[Any] = field(default_factory=list, repr=False)
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

    def tensor(self, info: TensorInfo) -> Any:
        """The tensor of ``info``, contiguous, built at most once per thread while it is being read."""
        local = self._local
        if getattr(local, "name", None) == info.name:
            return local.tensor
        local.name, local.tensor = None, None  # release the previous one before building the next
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

        from capmerge._torch import as_tensor

        t = self.tensor(info)
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        n = len(buf)
        if byte_offset + n > flat.numel():
            raise CheckpointError(f"read past the end of tensor {info.name}", self.ref)
        if n:
            as_tensor(buf, "U8").copy_(flat[byte_offset : byte_offset + n])

    def read_tensor(self, name: str) -> Any:
        info = self._info(name)
        t = self.tensor(info)
        self._local.name, self._local.tensor = None, None  # the caller owns it now
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
