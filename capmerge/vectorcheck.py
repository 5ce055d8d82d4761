"""Refuse a whole model where a capability vector belongs (``capmerge apply BASE FINETUNED_MODEL``).

Adding a model θ_ft to its base writes ≈ 2θ — garbage that looks like a successful merge. The rule:

1. A header that says what the file is decides: ``capmerge.kind`` = ``capability-vector`` / ``lora-adapter`` (what
   ``diff``, ``compress`` and adapters carry) or a compressed vector format is a vector; ``merged`` (what ``apply``
   writes) is a model.
2. Any other file is measured. For each sampled tensor, v the "vector" and θ the base's tensor,
   ``s = ‖v − θ‖ / ‖θ‖``: how far v lies from the base, relative to the base's size. A model finetuned from the
   base (v = θ + τ) has ``s = ‖τ‖/‖θ‖`` — about 0.001–0.2 for real finetunes. A task vector (v = τ) has
   ``s² = 1 + ρ² − 2ρ·cos(τ, θ)`` with ρ = ‖τ‖/‖θ‖: ≈ 1 for a small τ, ≥ 1 − ρ ≥ 0.5 whenever ρ ≤ 0.5, and
   √(1 + ρ²) ≥ 1 at any size when τ is orthogonal to θ (as finetuning deltas and random vectors are). The
   checkpoint is a model when the median s over the sample is below :data:`MODEL_DISTANCE` = 0.5: it lies within
   half the base's size of the base. Only a vector about as large as the base *and* nearly parallel to it (cos > 0.87
   at ρ = 1) — one that is, in effect, a copy of the base — falls below. Tensors whose base piece is zero (or not
   finite) say nothing and are left out; without any informative tensor nothing is refused.

The sample is cheap and taken before anything is written: at most :data:`SAMPLE_TENSORS` tensors spread over the
checkpoint, at most :data:`SAMPLE_PIECES` × :data:`PIECE` elements of each (pieces spread over the tensor), read from
both sides: ≤ 2 × 32 × 4 reads of 16 KiB (float32), 4 MiB whatever the model's size. ``allow_model_as_vector``
(``--allow-model-as-vector``) skips the check.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from capmerge.checkpoint import Checkpoint, TensorInfo
from capmerge.errors import ModelAsVectorError

MODEL_DISTANCE = 0.5
SAMPLE_TENSORS = 32
SAMPLE_PIECES = 4
PIECE = 4096
VECTOR_KINDS = ("capability-vector", "lora-adapter")
MODEL_KINDS = ("merged",)
_NUMPY_CODES = ("F64", "F32", "F16", "BF16")

Pieces = Callable[[str], "tuple[Any, Any] | None"]  # name -> (v, θ) sampled pieces as float64 numpy arrays


def pieces_of(numel: int) -> list[tuple[int, int]]:
    """Element ranges sampled from a tensor of ``numel`` elements: the whole of a small one, else
    :data:`SAMPLE_PIECES` ranges of :data:`PIECE` elements spread evenly from its first to its last element."""
    if numel <= SAMPLE_PIECES * PIECE:
        return [(0, numel)] if numel else []
    return [(s, s + PIECE) for s in (j * (numel - PIECE) // (SAMPLE_PIECES - 1) for j in range(SAMPLE_PIECES))]


def sample_names(names: Sequence[str]) -> list[str]:
    """At most :data:`SAMPLE_TENSORS` names spread evenly over ``names`` (first and last included)."""
    if len(names) <= SAMPLE_TENSORS:
        return list(names)
    idx = sorted({round(j * (len(names) - 1) / (SAMPLE_TENSORS - 1)) for j in range(SAMPLE_TENSORS)})
    return [names[i] for i in idx]


def median_distance(names: Sequence[str], pieces: Pieces) -> tuple[float, int]:
    """The median of ``‖v − θ‖/‖θ‖`` over the sampled tensors whose base piece is non-zero and finite, and how many
    there were (``(nan, 0)`` when none)."""
    import numpy as np

    ss = []
    for name in sample_names(names):
        got = pieces(name)
        if got is None:
            continue
        v, b = got
        nb = float(np.dot(b, b))
        if nb == 0.0 or not math.isfinite(nb):
            continue
        d = v - b
        nd = float(np.dot(d, d))
        if math.isfinite(nd):
            ss.append(math.sqrt(nd / nb))
    return (statistics.median(ss), len(ss)) if ss else (math.nan, 0)


def _as_float64(buf: bytearray, code: str) -> Any:
    import numpy as np

    if code == "BF16":
        return (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(buf, dtype={"F64": np.float64, "F32": np.float32, "F16": np.float16}[code]).astype(np.float64)


def _read_pieces(ck: Checkpoint, info: TensorInfo) -> Any:
    import numpy as np

    parts = []
    for s, e in pieces_of(info.numel):
        buf = bytearray((e - s) * info.itemsize)
        ck.read_into(info, s * info.itemsize, memoryview(buf))
        parts.append(_as_float64(buf, info.dtype))
    return np.concatenate(parts) if parts else np.zeros(0)


def header_verdict(ck: Checkpoint) -> str | None:
    """``vector`` or ``model`` when the header says what the checkpoint is, else None."""
    if getattr(ck, "kind", "dense") != "dense":
        return "vector"
    kind = ck.metadata.get("capmerge.kind")
    if kind in VECTOR_KINDS:
        return "vector"
    if kind in MODEL_KINDS:
        return "model"
    return None


def _judge(ck: Checkpoint | None, names: Callable[[], Sequence[str]], pieces: Pieces) -> str | None:
    """Why ``ck`` (or a mapping without a header, ``ck`` None) is a model, or None: its header first, else the
    median distance over the sample of ``names()``."""
    verdict = header_verdict(ck) if ck is not None else None
    if verdict == "vector":
        return None
    if verdict == "model":
        assert ck is not None
        return f"its header says capmerge.kind={ck.metadata.get('capmerge.kind')}"
    median, n = median_distance(names(), pieces)
    if not median < MODEL_DISTANCE:
        return None
    return (
        f"it lies close to BASE (median ‖v − base‖/‖base‖ = {median:.3g} over {n} tensor{'s' if n != 1 else ''}, "
        f"below {MODEL_DISTANCE:g}; a vector's is about 1)"
    )


def check_checkpoint(vector: Checkpoint, base: Checkpoint) -> None:
    """Raise :class:`ModelAsVectorError` if ``vector`` (names already paired with ``base``'s) is evidently a model."""

    def names() -> list[str]:
        return [
            name
            for name, info in vector.tensors.items()
            if info.dtype in _NUMPY_CODES
            and (ib := base.tensors.get(name)) is not None
            and ib.dtype in _NUMPY_CODES
            and ib.shape == info.shape
            and info.numel
        ]

    def pieces(name: str) -> tuple[Any, Any]:
        return _read_pieces(vector, vector.tensors[name]), _read_pieces(base, base.tensors[name])

    reason = _judge(vector, names, pieces)
    if reason is not None:
        raise _error(reason, vector.ref, "cli")


def check_state_dict(state_dict: Mapping[str, Any], vector: Mapping[str, Any], *, label: str) -> None:
    """The same rule for in-memory vectors (:func:`capmerge.apply_to_state_dict`): ``vector`` a mapping of tensors
    or a :class:`~capmerge.inmemory.LazyVector` (its header is read, and only the sampled pieces of its tensors)."""
    ck = getattr(vector, "checkpoint", None)

    def names() -> list[str]:
        return [k for k in vector if k in state_dict and state_dict[k].is_floating_point()]

    def pieces(name: str) -> tuple[Any, Any] | None:
        b = state_dict[name]
        if ck is not None:
            info = ck.tensors[name]
            if info.dtype not in _NUMPY_CODES or tuple(info.shape) != tuple(b.shape):
                return None
            v = _read_pieces(ck, info)
        else:
            t = vector[name]
            if not t.is_floating_point() or tuple(t.shape) != tuple(b.shape):
                return None
            v = _tensor_pieces(t)
        return v, _tensor_pieces(b)

    reason = _judge(ck, names, pieces)
    if reason is not None:
        raise _error(reason, getattr(ck, "ref", None) or label, "memory")


def _error(reason: str, ref: str, form: str, step: str | None = None) -> ModelAsVectorError:
    """The one-line error, its fix spelled for where the vector was given: ``cli`` (and :func:`capmerge.apply`),
    ``recipe`` (``step``: ``NAME (FILE:LINE)``) or ``memory`` (:func:`capmerge.apply_to_state_dict`)."""
    if form == "recipe":
        fix = f"list it under add: instead (the task vector {ref} − base), or set allow_model_as_vector: true"
    elif form == "memory":
        fix = (
            "pass the task vector MODEL − BASE instead (capmerge diff BASE MODEL -o vector.safetensors), "
            "or allow_model_as_vector=True"
        )
    else:
        fix = f"pass it as --add {ref} instead (the task vector {ref} − BASE), or use --allow-model-as-vector"
    prefix = f"step {step}: " if step else ""
    err = ModelAsVectorError(f"{prefix}a model, not a capability vector: {reason}; {fix}", ref)
    err.reason = reason
    return err


def for_recipe(err: ModelAsVectorError, step: str) -> ModelAsVectorError:
    """``err`` (raised by :func:`capmerge.apply` in a recipe step) with its fix in recipe keys."""
    return _error(err.reason, err.where or "", "recipe", step)


def _tensor_pieces(t: Any) -> Any:
    import numpy as np
    import torch

    flat = t.detach().reshape(-1)
    parts = [flat[s:e].to(device="cpu", dtype=torch.float64).numpy() for s, e in pieces_of(flat.numel())]
    return np.concatenate(parts) if parts else np.zeros(0)
