"""capmerge: model merging by weight arithmetic — capability vectors, streamed.

The public API is imported lazily so that ``import capmerge`` (and the CLI) start without torch.
"""

from __future__ import annotations

from capmerge import _startup

_startup.guard()  # first: Ctrl-C while the command line starts gives one line, not a traceback

from typing import TYPE_CHECKING, Any  # noqa: E402

from capmerge._version import __version__  # noqa: E402

_EXPORTS = {
    "diff": "capmerge.api",
    "apply": "capmerge.merging",
    "list_tensors": "capmerge.merging",
    "MergeOptions": "capmerge.methods",
    "Summary": "capmerge.api",
    "parse_size": "capmerge.api",
    "open_checkpoint": "capmerge.checkpoint",
    "Checkpoint": "capmerge.checkpoint",
    "TensorInfo": "capmerge.checkpoint",
    "load_vector": "capmerge.inmemory",
    "apply_to_state_dict": "capmerge.inmemory",
    "apply_to_model": "capmerge.inmemory",
    "CapmergeError": "capmerge.errors",
    "compress": "capmerge.compression",
    "CompressionSummary": "capmerge.compression",
    "compression_info": "capmerge.compression_record",
    "OrthogonalityLoss": "capmerge.ortho",
    "project_gradients": "capmerge.ortho",
    "inspect": "capmerge.analysis",
    "run_recipe": "capmerge.recipe",
    "push": "capmerge.hub",
    "pull": "capmerge.hub",
}

__all__ = [
    "__version__",
    "diff",
    "apply",
    "list_tensors",
    "MergeOptions",
    "Summary",
    "parse_size",
    "open_checkpoint",
    "Checkpoint",
    "TensorInfo",
    "load_vector",
    "apply_to_state_dict",
    "apply_to_model",
    "CapmergeError",
    "compress",
    "CompressionSummary",
    "compression_info",
    "OrthogonalityLoss",
    "project_gradients",
    "inspect",
    "run_recipe",
    "push",
    "pull",
]

if TYPE_CHECKING:
    from capmerge.analysis import inspect
    from capmerge.api import Summary, diff, parse_size
    from capmerge.checkpoint import Checkpoint, TensorInfo, open_checkpoint
    from capmerge.compression import CompressionSummary, compress
    from capmerge.compression_record import compression_info
    from capmerge.errors import CapmergeError
    from capmerge.hub import pull, push
    from capmerge.inmemory import apply_to_model, apply_to_state_dict, load_vector
    from capmerge.merging import apply, list_tensors
    from capmerge.methods import MergeOptions
    from capmerge.ortho import OrthogonalityLoss, project_gradients
    from capmerge.recipe import run_recipe


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'capmerge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
