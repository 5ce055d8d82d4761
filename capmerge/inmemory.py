"""In-memory helpers for trainers that already hold the weights: load a vector, add it in place."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from capmerge.checkpoint import Checkpoint, open_checkpoint
from capmerge.errors import MismatchError


class LazyVector(Mapping[str, Any]):
    """A read-on-access mapping name → tensor over a checkpoint (nothing is read until a key is used)."""

    def __init__(self, ck: Checkpoint, device: Any = "cpu") -> None:
        self.checkpoint = ck
        self.device = device

    def __getitem__(self, name: str) -> Any:
        if name not in self.checkpoint.tensors:
            raise KeyError(name)
        t = self.checkpoint.read_tensor(name)
        return t if str(self.device) == "cpu" else t.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, from the header (no data read)."""
        return self.checkpoint.tensors[name].shape

    def __len__(self) -> int:
        return len(self.checkpoint.tensors)


def load_vector(path: str | os.PathLike[str] | Checkpoint, *, lazy: bool = False, device: Any = "cpu") -> Any:
    """Load a capability vector (any checkpoint reference) as ``dict[str, Tensor]``.

    With ``lazy=True`` returns a :class:`LazyVector` that reads each tensor when it is accessed.
    """
    ck = open_checkpoint(path)
    lv = LazyVector(ck, device)
    return lv if lazy else {n: lv[n] for n in ck.tensors}


def _as_mapping(vector: Any) -> Mapping[str, Any]:
    if isinstance(vector, Mapping):
        return vector
    return load_vector(vector, lazy=True)


def apply_to_state_dict(
    state_dict: Mapping[str, Any], vector: Any, *, alpha: float = 1.0, allow_missing: bool = False
) -> list[str]:
    """θ ← θ + α·τ in place for every tensor of ``vector`` (a mapping or a checkpoint reference).

    The sum is computed in float32 (float64 for float64 tensors) on the tensor's own device and rounded once
    into the tensor's dtype. Names and shapes are checked first, so a mismatch changes nothing.
    Returns the names that were updated. Tensors that share storage (tied weights) are updated once.
    """
    import torch

    vec = _as_mapping(vector)
    missing = [n for n in vec if n not in state_dict]
    if missing and not allow_missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise MismatchError(f"{len(missing)} vector tensors are not in the state dict ({shown})")
    todo = []
    for n in vec:
        if n not in state_dict:
            continue
        p = state_dict[n]
        shape = tuple(vec[n].shape) if not isinstance(vec, LazyVector) else vec.shape(n)
        if tuple(p.shape) != shape:
            raise MismatchError(f"shape mismatch: {list(p.shape)} in the state dict vs {list(shape)} in the vector", n)
        if not p.is_floating_point():
            raise MismatchError(f"cannot add a vector to a {p.dtype} tensor", n)
        todo.append(n)
    done, seen = [], set()
    with torch.no_grad():
        for n in todo:
            p = state_dict[n]
            key = (p.device, p.data_ptr())
            if p.numel() and key in seen:
                continue
            seen.add(key)
            cd = torch.float64 if p.dtype == torch.float64 else torch.float32
            t = vec[n].to(device=p.device, dtype=cd)
            t.mul_(alpha)
            p.copy_(p.to(cd).add_(t))
            done.append(n)
    return done


def apply_to_model(model: Any, vector: Any, *, alpha: float = 1.0, allow_missing: bool = False) -> list[str]:
    """θ ← θ + α·τ in place on a ``torch.nn.Module``'s parameters and buffers (any device)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    vec = vector if isinstance(vector, Mapping) else LazyVector(open_checkpoint(vector))
    return apply_to_state_dict(tensors, vec, alpha=alpha, allow_missing=allow_missing)
