"""Spherical interpolation, model-centric: mergekit's ``slerp``, ``nuslerp`` and ``multislerp``.

All in float32, as mergekit computes them (its formulas and thresholds, written from the math):

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

import torch

from capmerge.merge.methods.models import ModelMethod, TensorInputs


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:  # fmt: skip
    """mergekit's SLERP of two tensors over all their elements (see the module's docstring); float32."""
    a, b = v0.float().reshape(-1), v1.float().reshape(-1)
    tt = torch.tensor(t, dtype=torch.float32)
    if a.numel() == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if float(dot.abs()) > dot_threshold:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        s = torch.sin(theta)
        ca, cb = torch.sin((1 - tt) * theta) / s, torch.sin(tt * theta) / s
    return (ca * a + cb * b).reshape(v0.shape)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False,
            eps: float = 1e-8) -> torch.Tensor:  # fmt: skip
    """SLERP of the vectors along ``dim`` (or of the flattened tensors), each pair on its own; float32."""
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


def _slerp(x: TensorInputs) -> torch.Tensor:
    if x.base is None or len(x.models) != 1:
        raise ValueError(f"tensor {x.name}: slerp takes a base model and exactly one other model")
    return slerp(float(x.params["t"]), x.base, x.models[0])  # type: ignore[arg-type]


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


def _multislerp(x: TensorInputs) -> torch.Tensor:
    if len(x.models) == 1:
        return x.models[0].float().clone()
    eps = float(x.params.get("eps", 1e-8))  # type: ignore[arg-type]
    base = None if x.base is None else x.base.float()
    vs = torch.stack([m.float() if base is None else m.float() - base for m in x.models]).reshape(len(x.models), -1)
    w = torch.tensor([float(p["weight"]) for p in x.model_params], dtype=torch.float32, device=vs.device)  # type: ignore[arg-type]
    if x.params.get("normalize_weights", True):
        w = w / w.sum()
    norms = torch.linalg.vector_norm(vs, dim=-1, keepdim=True)
    units = vs / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < eps:
        if len(x.models) != 2:
            raise ValueError(f"tensor {x.name}: multislerp's weighted mean of the unit vectors is zero (antipodal "
                             "models with balancing weights); choose other weights")  # fmt: skip
        out = vs[0] * w[0] + vs[1] * w[1]
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        r = (tangents * w.view(-1, 1)).sum(0)
        rn = torch.linalg.vector_norm(r) + eps
        out = (mean * torch.cos(rn) + r * (torch.sin(rn) / rn)) * (norms.squeeze(-1) * w).sum()
    out = out.reshape(x.models[0].shape)
    return out if base is None else out + base


MODEL_METHODS = (
    ModelMethod("slerp", _slerp, base="required", params={"t": None}, n_models=(1, 1),
                summary="spherical interpolation from the base (t = 0) to the other model (t = 1)"),
    ModelMethod("nuslerp", _nuslerp, base="optional", model_params={"weight": None},
                params={"nuslerp_flatten": True, "nuslerp_row_wise": False}, n_models=(2, 2),
                summary="spherical interpolation of two models (or their task vectors), t = w₂/(w₁ + w₂)"),
    ModelMethod("multislerp", _multislerp, base="optional", model_params={"weight": None},
                params={"normalize_weights": True, "eps": 1e-8},
                summary="weighted barycentre of several models (or task vectors) on the hypersphere"),
)  # fmt: skip
