"""Karcher mean, model-centric (mergekit's ``karcher``): the Riemannian barycentre of the models' directions on the unit
hypersphere, scaled by their mean norm.

For models θ_1..θ_K (flattened, equal weights 1/K; mergekit's karcher takes no per-model weight and no base): unit
vectors u_i = θ_i/‖θ_i‖ (those with ‖θ_i‖ ≤ ``tol`` leave the mean); start from the normalized mean of the u_i (the
first u_i when that mean is shorter than ``tol``), then at most ``max_iter`` times: the tangent step
g = Σ a_i·(φ_i/sin φ_i)·(u_i − cos φ_i·m), φ_i = arccos(m·u_i) (terms with φ_i < ``tol`` skipped); stop when
‖g‖ < ``tol``, else m ← cos‖g‖·m + sin‖g‖·g/‖g‖, renormalized. The result is (Σ_i ‖θ_i‖/K)·m.

Every iterate is a combination Σ c_i·θ_i, so the iteration runs on the coefficients, its norms and dot products from the
models' Gram matrix in float64 (the block form), and the kernel applies the final combination once. mergekit iterates
on float32 tensors; its arccos resolves angles near 0 only to ~3e-4 rad, so on nearly colinear tensors the two differ
by up to ~3e-4 of the largest value (tests/test_model_methods.py holds capmerge to the float64 iteration instead).
"""

from __future__ import annotations

import math

from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import ModelMethod


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
    ModelMethod("karcher", B.with_form(_form), base="unused", params={"max_iter": 10, "tol": 1e-5},
                form=_form,
                summary="Karcher (Riemannian) mean of the models on the hypersphere, scaled by their mean norm"),
)  # fmt: skip
