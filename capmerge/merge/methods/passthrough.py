"""Passthrough, model-centric (mergekit's ``passthrough``): one model's tensor as it is, times its optional ``scale``.

Layer slicing and stacking (mergekit's ``slices``) are the runner's job; per tensor the method only copies. The
default scale 1.0 stands for mergekit's "no scale": x·1.0 = x exactly in floating point.
"""

from __future__ import annotations

from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import ModelMethod


def _form(s: B.Spec) -> B.Finish | B.Copy | None:
    scale = s.model_params[0].get("scale") if s.model_params else None
    if scale is None or float(scale) == 1.0:
        return B.Copy(0)
    return lambda st: B.Combo([B.Term(0, float(scale))])  # type: ignore[arg-type]


MODEL_METHODS = (
    ModelMethod("passthrough", B.with_form(_form), base="unused", model_params={"scale": 1.0},
                n_models=(1, 1), form=_form,
                summary="one model's tensor as it is (times its scale)"),
)  # fmt: skip
