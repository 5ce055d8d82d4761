"""Spherical interpolation, model-centric: mergekit's ``slerp``, ``nuslerp`` and ``multislerp``.

mergekit's formulas and thresholds, written from the math. ``slerp``, ``multislerp`` and flattened ``nuslerp`` run as
block forms (:mod:`~capmerge.merge.methods.blockform`): each is, per tensor, a combination of its inputs whose
coefficients come from their norms and dot products (float64 sums), applied by the float32 kernel; row-wise
``nuslerp`` computes in float32 with torch.

* ``slerp`` (base θ₀, one model θ₁, global ``t``): over the whole flattened tensor, with the angle Ω of the unit
  vectors (norms below 1e-8 count as 1), out = sin((1−t)Ω)/sin Ω·θ₀ + sin(tΩ)/sin Ω·θ₁; when |cos Ω| > 0.9995
  (colinear or antipodal) the linear (1−t)·θ₀ + t·θ₁. ``t`` = 0 gives θ₀, 1 gives θ₁.
* ``nuslerp`` (two models with weights w₁, w₂; t = w₂/(w₁ + w₂), 0.5 when |w₁ + w₂| < 1e-6; with a base, the
  interpolation is between the task vectors θ_i − base and the base is added back): the same formula over the
  flattened tensor (``nuslerp_flatten``, default true), else row by row (vectors along the last dimension) or, with
  ``nuslerp_row_wise``, along dimension 0. Pairs with 1 − cos² Ω ≤ 1e-16 are interpolated linearly.
* ``multislerp`` (any number of models, weights normalized to sum 1 unless ``normalize_weights`` is false; with a base,
  over the task vectors): unit vectors u_i = v_i/(‖v_i‖ + eps); their weighted mean m, normalized, is the point of
  tangency; the weighted mean r of the tangent components u_i − (u_i·m)·m is mapped back by the exponential map
  m·cos‖r‖ + r·sin‖r‖/‖r‖ (‖r‖ + eps) and scaled by Σ w_i·‖v_i‖. A weighted mean of norm below eps falls back to
  w₁·v₁ + w₂·v₂ for two models and is an error for more.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import ModelMethod, TensorInputs, weights_sum_to_zero

if TYPE_CHECKING:
    import torch


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False,
            eps: float = 1e-8) -> torch.Tensor:  # fmt: skip
    """SLERP of the vectors along ``dim`` (or of the flattened tensors), each pair on its own; float32."""
    import torch

    shape = v0.shape
    a, b = v0.float(), v1.float()
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif dim != -1:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    tt = torch.tensor(t, dtype=torch.float32)
    cos = (unit(a) * unit(b)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    out = torch.where(
        colinear, (1 - tt) * a + tt * b, (torch.sin((1 - tt) * theta) * a + torch.sin(tt * theta) * b) / s
    )
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def _nuslerp(x: TensorInputs) -> torch.Tensor:
    if len(x.models) != 2:
        raise ValueError(f"tensor {x.name}: nuslerp takes exactly two models (besides an optional base)")
    w0, w1 = (float(p["weight"]) for p in x.model_params)  # type: ignore[arg-type]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    kw = {"dim": 0 if x.params.get("nuslerp_row_wise") else -1, "flatten": bool(x.params.get("nuslerp_flatten", True))}
    if x.base is None:
        return nuslerp(t, x.models[0], x.models[1], **kw)  # type: ignore[arg-type]
    base = x.base.float()
    return base + nuslerp(t, x.models[0].float() - base, x.models[1].float() - base, **kw)  # type: ignore[arg-type]


def _slerp_coefficients(t: float, cos: float, *, colinear: bool) -> tuple[float, float]:
    if colinear:
        return B.fp32(1 - B.fp32(t)), t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _slerp_form(s: B.Spec) -> B.Finish | None:
    """out = c₀·θ₀ + c₁·θ₁ with the angle from the Gram matrix of (base, model), in float64."""
    if not s.has_base or s.n_models != 1:
        return None
    t = float(s.params["t"])

    def finish(st: B.Stats) -> B.Combo:
        m = st.moments(include_base=True)
        na, nb = (n if n > 1e-8 else 1.0 for n in (m.norm(0), m.norm(1)))
        cos = min(1.0, max(-1.0, m.gram[0][1] / (na * nb)))
        ca, cb = _slerp_coefficients(t, cos, colinear=abs(cos) > 0.9995)
        return B.Combo([B.Term(-1, ca), B.Term(0, cb)])

    return finish


def _nuslerp_form(s: B.Spec) -> B.Finish | None:
    """nuslerp over the flattened tensors (``nuslerp_flatten``, the default): two coefficients from the Gram matrix
    of the two models (or task vectors); row-wise variants use the float32 ``fn``."""
    if s.n_models != 2 or not s.params.get("nuslerp_flatten", True):
        return None
    w0, w1 = (float(p["weight"]) for p in s.model_params)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)

    def finish(st: B.Stats) -> B.Combo:
        m = st.moments(relative=True)
        na, nb = max(m.norm(0), 1e-7), max(m.norm(1), 1e-7)
        cos = min(1.0, max(-1.0, m.gram[0][1] / (na * nb)))
        ca, cb = _slerp_coefficients(t, cos, colinear=1 - cos * cos <= 1e-16)
        return B.Combo([B.Term(0, ca), B.Term(1, cb)], relative=s.has_base, with_base=s.has_base)

    return finish


def _multislerp_form(s: B.Spec) -> B.Finish | B.Copy | None:
    """The barycentre's coefficients on each model (or task vector) from their Gram matrix, in float64."""
    if s.n_models == 1:
        return B.Copy(0)
    eps = float(s.params.get("eps", 1e-8))
    w = [float(p["weight"]) for p in s.model_params]
    if s.params.get("normalize_weights", True):
        total = sum(w)
        if total == 0:  # the planner refuses it first (weights_sum_to_zero); merge_state_dicts gets here
            raise ValueError(f"tensor {s.name}: the weights sum to 0, and normalize_weights divides by their sum")
        w = [x / total for x in w]
    k = len(w)

    def finish(st: B.Stats) -> B.Combo:
        m = st.moments(relative=True)
        g = m.gram
        norms = [m.norm(i) for i in range(k)]

        def quad(c: list[float]) -> float:
            return max(0.0, sum(c[i] * g[i][j] * c[j] for i in range(k) for j in range(k)))

        unit = [1.0 / (n + eps) for n in norms]  # u_i = unit[i]·v_i
        mean = [w[i] * unit[i] for i in range(k)]
        mean_norm = math.sqrt(quad(mean))
        if mean_norm < eps:
            if k != 2:
                raise ValueError("multislerp's weighted mean of the unit vectors is zero (antipodal models with "
                                 "balancing weights); choose other weights")  # fmt: skip
            coef = w
        else:
            mean = [c / mean_norm for c in mean]
            gm = [sum(g[i][j] * mean[j] for j in range(k)) for i in range(k)]  # v_i·m
            along = sum(w[i] * unit[i] * gm[i] for i in range(k))  # Σ w_i (u_i·m)
            r = [w[i] * unit[i] - along * mean[i] for i in range(k)]
            rn = math.sqrt(quad(r)) + eps
            scale = sum(wi * n for wi, n in zip(w, norms, strict=True))
            coef = [(mean[i] * math.cos(rn) + r[i] * (math.sin(rn) / rn)) * scale for i in range(k)]
        return B.Combo([B.Term(i, c) for i, c in enumerate(coef)], relative=s.has_base, with_base=s.has_base)

    return finish


MODEL_METHODS = (
    ModelMethod("slerp", B.with_form(_slerp_form, refuse="slerp takes a base model and exactly one other model"),
                base="required", params={"t": None}, n_models=(1, 1),
                form=_slerp_form,
                summary="spherical interpolation from the base (t = 0) to the other model (t = 1)"),
    ModelMethod("nuslerp", B.with_form(_nuslerp_form, _nuslerp), base="optional", model_params={"weight": None},
                form=_nuslerp_form,
                params={"nuslerp_flatten": True, "nuslerp_row_wise": False}, n_models=(2, 2),
                summary="spherical interpolation of two models (or their task vectors), t = w₂/(w₁ + w₂)"),
    ModelMethod("multislerp", B.with_form(_multislerp_form), base="optional",
                model_params={"weight": None}, form=_multislerp_form, check=weights_sum_to_zero("normalize_weights"),
                params={"normalize_weights": True, "eps": 1e-8},
                summary="weighted barycentre of several models (or task vectors) on the hypersphere"),
)  # fmt: skip
