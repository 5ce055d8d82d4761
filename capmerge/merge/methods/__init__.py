"""Merge methods: one module per family (``linear``, ``ties``, ``dare``, ``breadcrumbs``), collected by name in
:mod:`~capmerge.merge.methods.registry`; :mod:`~capmerge.merge.methods.base` holds what they are made of.

| method | prune | sign | normalize | rescale |
|---|---|---|---|---|
| task_arithmetic | none | none | no | – |
| ties | magnitude | total | yes | – |
| dare_linear | random | none | no | yes |
| dare_ties | random | total | no | yes |
| breadcrumbs | breadcrumbs | none | no | – |
| breadcrumbs_ties | breadcrumbs | total | no | – |
| magnitude | magnitude | none | no | – |

Any individual option given explicitly overrides the method's.

The model-centric methods (mergekit's merge methods: whole models in, one function per tensor) are
:mod:`~capmerge.merge.methods.models` and one module per family (``gta``, ``slerp``, ``karcher``, ``model_stock``,
``sce``, ``nearswap``, ``arcee_fusion``, ``passthrough``), collected by
:func:`~capmerge.merge.methods.registry.get_model_method`.
"""

from capmerge.merge.methods.base import PRUNES, SIGNS, MergeOptions, Method, keep_count, tensor_key
from capmerge.merge.methods.registry import METHODS, PRESETS, get, resolve

__all__ = ["METHODS", "PRESETS", "PRUNES", "SIGNS", "MergeOptions", "Method", "get", "keep_count", "resolve",
           "tensor_key"]  # fmt: skip
