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
    "apply": "capmerge.merge.apply",
    "list_tensors": "capmerge.merge.apply",
    "MergeOptions": "capmerge.merge.methods",
    "Summary": "capmerge.merge.summary",
    "parse_size": "capmerge.io.writer",
    "open_checkpoint": "capmerge.io.open",
    "Checkpoint": "capmerge.io.checkpoint",
    "TensorInfo": "capmerge.io.checkpoint",
    "load_vector": "capmerge.inmemory",
    "apply_to_state_dict": "capmerge.inmemory",
    "apply_to_model": "capmerge.inmemory",
    "merge_state_dicts": "capmerge.inmemory",
    "CapmergeError": "capmerge.errors",
    "compress": "capmerge.io.compress",
    "CompressionSummary": "capmerge.io.compression_record",
    "compression_info": "capmerge.io.compression_record",
    "OrthogonalityLoss": "capmerge.ortho",
    "project_gradients": "capmerge.ortho",
    "inspect": "capmerge.analysis.stats",
    "run_recipe": "capmerge.recipes.recipe",
    "run_mergekit": "capmerge.recipes.mergekit",
    "merge_models": "capmerge.recipes.mergekit",
    "push": "capmerge.share",
    "pull": "capmerge.share",
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
    "merge_state_dicts",
    "CapmergeError",
    "compress",
    "CompressionSummary",
    "compression_info",
    "OrthogonalityLoss",
    "project_gradients",
    "inspect",
    "run_recipe",
    "run_mergekit",
    "merge_models",
    "push",
    "pull",
]

if TYPE_CHECKING:
    from capmerge.analysis.stats import inspect
    from capmerge.api import diff
    from capmerge.errors import CapmergeError
    from capmerge.inmemory import apply_to_model, apply_to_state_dict, load_vector, merge_state_dicts
    from capmerge.io.checkpoint import Checkpoint, TensorInfo
    from capmerge.io.compress import compress
    from capmerge.io.compression_record import CompressionSummary, compression_info
    from capmerge.io.open import open_checkpoint
    from capmerge.io.writer import parse_size
    from capmerge.merge.apply import apply, list_tensors
    from capmerge.merge.methods import MergeOptions
    from capmerge.merge.summary import Summary
    from capmerge.ortho import OrthogonalityLoss, project_gradients
    from capmerge.recipes.mergekit import merge_models, run_mergekit
    from capmerge.recipes.recipe import run_recipe
    from capmerge.share import pull, push


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
