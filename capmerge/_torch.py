"""The few places capmerge touches torch, imported lazily so the CLI starts without it."""

from __future__ import annotations

import warnings
from typing import Any

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_code] = getattr(torch, _attr)
SAFETENSORS_CODES = {v: k for k, v in TORCH_DTYPES.items()}


def torch_dtype(code: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[code]
    except KeyError:
        raise ValueError(f"dtype {code} is not supported by this torch build") from None


def as_tensor(buf: Any, code: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A zero-copy tensor view of a writable buffer (bytearray / memoryview) holding ``code`` elements."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns on read-only buffers; we never write through them
        t = torch.frombuffer(buf, dtype=torch.uint8) if len(memoryview(buf)) else torch.empty(0, dtype=torch.uint8)
    t = t.view(torch_dtype(code))
    return t.view(shape) if shape is not None else t


def tensor_from_bytes(buf: bytearray, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    return as_tensor(buf, code, shape)
