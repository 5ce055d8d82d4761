"""capmerge.kernels.device: the device rule, and the package map of the Triton GPU kernels.

``kernels/`` is installed as ``capmerge.kernels``. It has no ``__init__.py`` on purpose: a namespace portion never
shadows the installed ``kernels`` distribution (which transformers >= 5 imports) when Python runs from the repository
root, and ``capmerge/kernels`` is a symlink to it so that editable installs find it under ``capmerge``.

Layout (Liger-Kernel style): ``utils.py`` holds the ``@triton.jit`` building blocks (float32 loads, round-once
stores) and the launchers' checks; ``diff.py`` / ``merge.py`` a kernel each plus its typed launcher; ``dispatch.py``
the one place that decides between these launchers and the CPU path (:mod:`capmerge.merge.compute`,
:mod:`capmerge.functional`).

Triton and torch are imported lazily: ``import capmerge.kernels.device`` and :func:`resolve_device` on a machine
without a GPU import neither, so ``capmerge --help`` and a CPU ``capmerge apply`` stay fast.

With ``TRITON_INTERPRET=1`` (and no GPU) the kernels run in Triton's interpreter on CPU tensors; ``--device cuda``
then means "the Triton kernels, interpreted" — slow, for tests only.
"""

from __future__ import annotations

import functools
import glob
import os

from capmerge.errors import UsageError

MAX_TERMS = 8
"""The merge kernel is specialised for K = 0..MAX_TERMS vectors; more fall back to the CPU path."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def triton_error() -> str | None:
    """None when triton imports, else the reason (one line)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "no triton"
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _gpu_present() -> bool:
    """A cheap check (no torch import) for a GPU driver: NVIDIA device nodes or the ROCm kfd."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    """True when triton imports and the kernels can run: a CUDA device, or ``TRITON_INTERPRET=1``."""
    if triton_error() is not None:
        return False
    if interpreting():
        return True
    try:
        return _cuda_count() > 0
    except Exception:  # noqa: BLE001
        return False


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → ``"cpu"`` or ``"cuda:N"``.

    ``auto`` is CUDA when a GPU is present and triton imports, else the CPU. An explicit ``cuda`` that cannot be
    honoured is an error (:class:`~capmerge.errors.UsageError`), never a silent fallback.
    """
    dev = "auto" if device is None else str(device).strip().lower()
    if dev == "cpu":
        return "cpu"
    if dev == "auto":
        if not _gpu_present() or triton_error() is not None:
            return "cpu"
        try:
            if _cuda_count() == 0:
                return "cpu"
            import torch

            return f"cuda:{torch.cuda.current_device()}"
        except Exception:  # noqa: BLE001 - a broken driver means no GPU for auto
            return "cpu"
    if dev != "cuda" and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise UsageError(f"invalid --device {device!r} (choose from auto, cpu, cuda, cuda:N)")
    index = int(dev[5:]) if dev.startswith("cuda:") else None
    err = triton_error()
    if err is not None:
        raise UsageError(f"--device {dev} needs triton, which does not import ({err})")
    if interpreting() and _cuda_count_safe() == 0:
        return f"cuda:{index or 0}"  # interpreted kernels on CPU tensors (tests)
    count = _cuda_count_safe()
    if count == 0:
        raise UsageError(f"--device {dev} asked for, but no CUDA GPU is available (torch.cuda.is_available() is False)")
    if index is None:
        import torch

        index = torch.cuda.current_device()
    if index >= count:
        raise UsageError(f"--device {dev} asked for, but only {count} CUDA device(s) are visible")
    return f"cuda:{index}"


def _cuda_count_safe() -> int:
    try:
        return _cuda_count()
    except Exception:  # noqa: BLE001
        return 0


def torch_device(device: str):  # -> torch.device
    """Where the tensors of a resolved device live: ``cuda:N``, or the CPU when the kernels are interpreted."""
    import torch

    if device == "cpu" or (interpreting() and _cuda_count_safe() == 0):
        return torch.device("cpu")
    return torch.device(device)


__all__ = ["MAX_TERMS", "interpreting", "is_available", "resolve_device", "torch_device", "triton_error"]
