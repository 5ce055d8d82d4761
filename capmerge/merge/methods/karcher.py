"""Karcher mean, model-centric (mergekit's ``karcher``): the Riemannian barycentre of the models' directions on the unit
hypersphere, scaled by their mean norm.

For models θ_1..θ_K (flattened, equal weights 1/K; mergekit's karcher takes no per-model weight and no base): unit
vectors u_i = θ_i/‖θ_i‖ (those with ‖θ_i‖ ≤ ``tol`` leave the mean); start from the normalized mean of the u_i (the
first u_i when that mean is shorter than ``tol``), then at most ``max_iter`` times: the tangent step
g = Σ a_i·(φ_i/sin φ_i)·(u_i − cos φ_i·m), φ_i = arccos(m·u_i) (terms with φ_i < ``tol`` skipped); stop when
‖g‖ < ``tol``, else m ← cos‖g‖·m + sin‖g‖·g/‖g‖, renormalized. The result is (Σ_i ‖θ_i‖/K)·m. In float32, in the order
mergekit computes it.
"""

from __future__ import annotations

import math

import torch

from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import ModelMethod, TensorInputs


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], *, max_iter: int = 10, tol: float = 1e-5,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """The weighted Karcher mean of ``tensors`` (see the module's docstring) computed in ``dtype`` (mergekit's
    float32 by default: the fallback of the block form, and in float64 the tests' reference), the tensors' shape."""
    xs = [t.to(dtype) for t in tensors]
    if len(xs) == 1:
        return xs[0].clone()
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if float(n) == 0.0 else x / n for x, n in zip(xs, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for ai, u in zip(a, us, strict=True):
        mean += ai * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = us[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, us, strict=True):
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    scale = sum(ai * n for ai, n in zip(alphas, norms, strict=True))
    return scale * mean


def _karcher(x: TensorInputs) -> torch.Tensor:
    k = len(x.models)
    max_iter = int(x.params.get("max_iter", 10))  # type: ignore[call-overload]
    tol = float(x.params.get("tol", 1e-5))  # type: ignore[arg-type]
    return karcher_mean(list(x.models), [1.0 / k] * k, max_iter=max_iter, tol=tol)


def _form(s: B.Spec) -> B.Finish | B.Copy | None:
    """The same iteration on coefficients: every iterate is a combination Σ c_i·θ_i, its norms and dot products
    come from the Gram matrix of the models (float64)."""
    k = s.n_models
    if k == 1:
        return B.Copy(0)
    max_iter, tol = int(s.params.get("max_iter", 10)), float(s.params.get("tol", 1e-5))

    def finish(st: B.Stats) -> B.Combo:
        g = st.moments().gram
        norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]

        def dot(a: list[float], b: list[float]) -> float:
            return sum(a[i] * g[i][j] * b[j] for i in range(k) for j in range(k))

        def unit(i: int) -> list[float]:
            return [1.0 / norms[i] if j == i else 0.0 for j in range(k)]

        valid = [i for i in range(k) if norms[i] > tol]
        if not valid:
            return B.Combo([])
        a = {i: (1.0 / k) / sum(1.0 / k for _ in valid) for i in valid}
        mean = [a.get(i, 0.0) / norms[i] if i in a else 0.0 for i in range(k)]
        mn = math.sqrt(max(dot(mean, mean), 0.0))
        mean = unit(valid[0]) if mn < tol else [c / mn for c in mean]
        for _ in range(max_iter):
            tangent = [0.0] * k
            for i in valid:
                u = unit(i)
                cos = min(1.0, max(-1.0, dot(mean, u)))
                theta = math.acos(cos)
                if theta < tol:
                    continue
                f = a[i] * theta / math.sin(theta)
                tangent = [tg + f * (ui - cos * mi) for tg, ui, mi in zip(tangent, u, mean, strict=True)]
            tn = math.sqrt(max(dot(tangent, tangent), 0.0))
            if tn < tol:
                break
            mean = [math.cos(tn) * mi + math.sin(tn) * tg / tn for mi, tg in zip(mean, tangent, strict=True)]
            un = math.sqrt(max(dot(mean, mean), 0.0))
            if un > tol:
                mean = [c / un for c in mean]
        scale = sum(n / k for n in norms)
        return B.Combo([B.Term(i, scale * c) for i, c in enumerate(mean)])

    return finish


MODEL_METHODS = (
    ModelMethod("karcher", B.with_form(_form, _karcher), base="unused", params={"max_iter": 10, "tol": 1e-5},
                form=_form,
                summary="Karcher (Riemannian) mean of the models on the hypersphere, scaled by their mean norm"),
)  # fmt: skip
