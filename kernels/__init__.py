"""capmerge.kernels: Triton GPU kernels (installed from the top-level ``kernels/`` folder).

Triton is imported lazily: ``import capmerge`` and ``import capmerge.kernels`` work on machines without it.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    """True when triton imports and a CUDA device is present (or ``TRITON_INTERPRET=1`` is set)."""
    import os

    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


__all__ = ["is_available"]
