"""Generalized task arithmetic, model-centric (mergekit's ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``): one function, the methods differ only in how each
task vector is pruned and whether signs are elected.

For one tensor, base θ and models θ_1..θ_K with weights w_i::

    τ_i = θ_i − θ                                       (float32)
    τ̃_i = prune(τ_i)                                    (magnitude / random / breadcrumbs / DELLA; then, with
                                                          ``rescale``, scaled to ‖τ_i‖₁ — capmerge.functional)
    s   = sign of Σ w_i·τ̃_i  (+ on a tie)               (TIES variants only)
    m_i = [sign(w_i·τ̃_i) = s]                           (all ones without election)
    δ   = Σ w_i·m_i·τ̃_i, divided elementwise by Σ w_i·m_i with ``normalize`` (a zero divisor — or, without election,
          |Σ w_i| < 1e-8 — divides by 1)
    out = θ + λ·δ

Pruning counts are mergekit's: the magnitude methods keep k = max(1, int(d·n)) entries (breadcrumbs int(d·n) after
dropping the int(γ·n) largest, fewer outliers when d + γ > 1); entries tied with the threshold are all kept (mergekit
keeps an arbitrary k of them). The random methods draw counter-based Philox masks keyed by (seed, tensor name, model
index): the same seed gives the same output on every device, never torch's global generator. ``int8_mask`` is
accepted and ignored: in mergekit it only stores the agreement mask as int8 to save memory, which cannot change a
float32 result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from capmerge import functional as F
from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import ModelMethod, TensorInputs
from capmerge.merge.plan import kth_largest_abs_tensor

if TYPE_CHECKING:
    import torch

    Prune = Callable[[torch.Tensor, Mapping[str, object], int, TensorInputs], torch.Tensor]


def magnitude_k(d: float, n: int) -> int | None:
    """mergekit's magnitude count: the max(1, int(d·n)) largest |τ| are kept; None: nothing (d ≤ 0, n = 0)."""
    return max(1, int(d * n)) if d > 0 and n else None


def breadcrumbs_ks(d: float, gamma: float, n: int) -> tuple[int, int] | None:
    """Breadcrumbs' ranks (lo, top): keep the entries below the ``top`` largest |τ| down to rank ``lo`` = top +
    int(d·n) (no upper cut when top = 0); the outlier cut int(γ·n) shrinks so that int(d·n) entries remain.
    None: nothing kept."""
    keep = int(d * n)
    if keep <= 0:
        return None
    top = max(0, min(int(gamma * n), n - keep))
    return top + keep, top


def _magnitude(tau: torch.Tensor, p: Mapping[str, object], i: int, x: TensorInputs) -> torch.Tensor:
    import torch

    k = magnitude_k(float(p["density"]), tau.numel())  # type: ignore[arg-type]
    return torch.zeros_like(tau) if k is None else F.magnitude_prune(tau, threshold=kth_largest_abs_tensor(tau, [k])[k])


def _native_draws(key: int, like: torch.Tensor, *, ints: bool = False) -> torch.Tensor | None:
    """The native kernel's :func:`F.philox_range` floats (``ints``: :func:`F.philox_ints`' integers, int64) of
    elements 0 .. n − 1 shaped like ``like`` (the same numbers, tests/test_functional.py and test_native.py; ~100×
    faster than the int64 torch reference); None off the CPU or without the kernel."""
    import torch

    n = like.numel()
    if like.device.type != "cpu" or not n or os.environ.get("CAPMERGE_NO_NATIVE"):
        return None
    try:
        from capmerge import _native
    except ImportError:
        return None
    out = torch.empty(n, dtype=torch.int32 if ints else torch.float32)
    (_native.philox_ints if ints else _native.philox)(key, 0, n, out.numpy())
    return (out.to(torch.int64) if ints else out).reshape(like.shape)


def _uniform(key: int, like: torch.Tensor) -> torch.Tensor:
    """``F.philox_uniform(key, arange(n))`` shaped like ``like``: the native kernel's where it runs."""
    got = _native_draws(key, like)
    return got if got is not None else F.philox_range(key, 0, like.numel(), like.device).reshape(like.shape)


def _ints(key: int, like: torch.Tensor) -> torch.Tensor:
    """``F.philox_ints(key, 0, n)`` shaped like ``like``: the native kernel's where it runs."""
    got = _native_draws(key, like, ints=True)
    return got if got is not None else F.philox_ints(key, 0, like.numel(), like.device).reshape(like.shape)


def _random(tau: torch.Tensor, p: Mapping[str, object], i: int, x: TensorInputs) -> torch.Tensor:
    """``F.random_prune(tau, d, key=..., rescale=False)``: keep where u < d."""
    import torch

    d = max(float(p["density"]), 0.0)  # type: ignore[arg-type]
    if d >= 1.0:
        return tau.float().clone()
    u = _uniform(F.tensor_key(x.seed, x.name, i), tau)
    return torch.where(
        u < torch.tensor(d, dtype=torch.float32), tau.float(), torch.zeros_like(tau, dtype=torch.float32)
    )


def _breadcrumbs(tau: torch.Tensor, p: Mapping[str, object], i: int, x: TensorInputs) -> torch.Tensor:
    import torch

    d = float(p["density"])  # type: ignore[arg-type]
    ks = breadcrumbs_ks(d, float(p["gamma"]), tau.numel())  # type: ignore[arg-type]
    if ks is None:
        return torch.zeros_like(tau)
    lo, top = ks
    v = kth_largest_abs_tensor(tau, [lo, *([top] if top > 0 else [])])
    return F.breadcrumbs_prune(tau, d, thresholds=(v[lo], v[top] if top > 0 else float("inf")))


def della_check(params: Mapping[str, object], model_params: Sequence[Mapping[str, object]]) -> Any:
    """The first model whose parameters :func:`F.della_refusal` refuses, and why; asked by the planner of every
    tensor before anything is read."""
    for i, p in enumerate(model_params):
        why = F.della_refusal(float(p["density"]), float(p["epsilon"]))  # type: ignore[arg-type]
        if why:
            return i, why
    return None


def _della(tau: torch.Tensor, p: Mapping[str, object], i: int, x: TensorInputs) -> torch.Tensor:
    """``F.della_prune(tau, d, ε, key=..., rescale=False)`` with the native kernel's draws."""
    d, eps = float(p["density"]), float(p["epsilon"])  # type: ignore[arg-type]
    try:
        return F.della_prune(tau, d, eps, key=F.tensor_key(x.seed, x.name, i), rescale=False, words=_ints)
    except ValueError as e:
        raise ValueError(f"tensor {x.name}, model {i + 1}: {e}") from None


def _pruned(prune: Prune, x: TensorInputs, base: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for i, (model, p) in enumerate(zip(x.models, x.model_params, strict=True)):
        tau = model.float() - base
        if float(p["density"]) < 1.0:  # type: ignore[arg-type]  # density ≥ 1: τ as it is (no rescale)
            kept = prune(tau, p, i, x)
            tau = F.rescale_l1(tau, kept) if x.params.get("rescale") else kept
        out.append(tau)
    return out


def generalized_task_arithmetic(x: TensorInputs, *, prune: Prune | None, elect: bool) -> torch.Tensor:
    """θ + λ·δ for one tensor (see the module's docstring); ``prune`` None: no pruning, ``elect``: TIES election."""
    import torch

    if x.base is None:
        raise ValueError(f"tensor {x.name}: this method needs a base model")
    base = x.base.float()
    if not x.models:
        return base.clone()
    weights = [float(p["weight"]) for p in x.model_params]  # type: ignore[arg-type]
    taus = _pruned(prune, x, base) if prune is not None else [m.float() - base for m in x.models]
    sign = F.elect_sign(taus, weights, "total") if elect else None
    delta, den = F.disjoint_merge(taus, weights, sign, weighted_agreement=True)
    if x.params.get("normalize"):
        zero = den == 0 if elect else den.abs() < 1e-8
        delta = delta / torch.where(zero, torch.ones_like(den), den)
    lam = float(x.params.get("lambda", 1.0))  # type: ignore[arg-type]
    if lam != 1.0:
        delta = delta * lam
    return base + delta


def gta_form(prune: Prune | None, elect: bool) -> B.Form:
    """The block form of :func:`generalized_task_arithmetic`. Random and DELLA pruning record their keep bits in the
    statistics pass (DELLA compares entries within rows there) and the merge replays them, scaled by the ``rescale``
    ratio. None (the float32 function runs instead) for weights of mixed sign under election, whose agreement test
    mergekit makes on w_i·τ_i; a normalizer that can be ≤ 0; ``rescale`` together with ``normalize`` for the
    magnitude methods (their ratio is folded into the weights); DELLA over a tensor of more than two dimensions (rows
    along dim 1) or with an invalid ε (the function reports it)."""

    def form(s: B.Spec) -> B.Finish | None:
        if not s.has_base:
            return None
        weights = [float(p["weight"]) for p in s.model_params]
        dens = [float(p["density"]) for p in s.model_params]
        pruned = [prune is not None and d < 1.0 for d in dens]
        normalize, rescale = bool(s.params.get("normalize")), bool(s.params.get("rescale")) and any(pruned)
        bitwise = prune in (_random, _della)  # kept entries replayed from keep bits, the rescale as their scale
        if elect and any(w < 0 for w in weights):
            return None
        if normalize and ((not elect and sum(weights) < 1e-8) or (rescale and not bitwise)):
            return None
        if prune is _della:
            eps = [float(p["epsilon"]) for p in s.model_params]
            # the bounds della_prune refuses, or no band between them (ε ≤ 0): the torch code
            torch_only = [0 < d < 1 and (d - e >= d + e or F.della_refusal(d, e) is not None)
                          for d, e in zip(dens, eps, strict=True)]  # fmt: skip
            if len(s.shape) > 2 or any(torch_only):
                return None

        def finish(st: B.Stats) -> B.Combo:
            n = s.numel
            ranks: dict[int, tuple[int, int] | None] = {}  # model -> the ranks of its thresholds (None: drop all)
            for i, (d, p) in enumerate(zip(dens, s.model_params, strict=True)):
                if pruned[i] and prune is _magnitude:
                    k = magnitude_k(d, n)
                    ranks[i] = None if k is None else (k, 0)
                elif pruned[i] and prune is _breadcrumbs:
                    ranks[i] = breadcrumbs_ks(d, float(p["gamma"]), n)
            # every model's thresholds in one pass over the base and the models
            v = st.kth_abs_many({i: [r for r in ks if r > 0] for i, ks in ranks.items() if ks is not None})
            prunes = []
            for i, d in enumerate(dens):
                if not pruned[i]:
                    prunes.append(B.KEEP_ALL)
                elif i in ranks:
                    ks = ranks[i]
                    if ks is None:
                        prunes.append(B.DROP_ALL)
                    elif prune is _magnitude:
                        prunes.append((B.MAGNITUDE, v[i][ks[0]], 0.0, 0))
                    else:
                        lo, top = ks
                        prunes.append((B.BAND, v[i][lo], v[i][top] if top > 0 else math.inf, 0))
                elif d <= 0 or n == 0:
                    prunes.append(B.DROP_ALL)
                else:  # random, DELLA
                    prunes.append((B.RANDOM, d, 0.0, F.tensor_key(s.seed, s.name, i)))
            w = list(weights)
            bits: list[object] = [None] * len(w)
            sums: dict[int, tuple[float, float]] = {}  # model -> (Σ|τ|, Σ|kept τ|)
            if prune is _della:  # rows of dim 1 (a tensor of one dimension is one row)
                m = s.shape[1] if len(s.shape) == 2 else n
                terms = [(i, *F.della_bounds(dens[i], float(s.model_params[i]["epsilon"])), p[3])
                         for i, p in enumerate(prunes) if p[0] == B.RANDOM]  # fmt: skip
                for i, (l1, kept, b) in st.della(terms, m).items() if terms else ():
                    bits[i], sums[i], prunes[i] = b, (l1, kept), (B.BITS, 0.0, 0.0, 0)
            elif rescale:
                mo = st.moments(relative=True, prune=prunes, gram=False, l1=True, masks=prune is _random)
                for i in (i for i in range(len(w)) if pruned[i]):
                    sums[i] = (mo.l1[i], mo.kept[i])
                    if mo.masks and mo.masks[i] is not None:  # the merge replays the keep bits: no second draw
                        bits[i], prunes[i] = mo.masks[i], (B.BITS, 0.0, 0.0, 0)
            for i, (l1, kept) in sums.items() if rescale else ():
                # pruned·(‖τ‖₁/‖pruned‖₁), the ratio in float32 as mergekit rounds it: the keep bits' scale, or
                # folded into the weight (magnitude, breadcrumbs)
                before, after = B.fp32(l1), B.fp32(kept)
                if before >= 1e-7 and after >= 1e-7:
                    ratio = B.fp32(before / after)
                    if prunes[i][0] == B.BITS:
                        prunes[i] = (B.BITS, ratio, 0.0, 0)
                    else:
                        w[i] = w[i] * ratio
            terms = [B.Term(i, wi, pr, bi) for i, (wi, pr, bi) in enumerate(zip(w, prunes, bits, strict=True))]
            return B.Combo(terms, relative=True, with_base=True, sign="total" if elect else "none",
                           normalize=normalize, lam=float(s.params.get("lambda", 1.0)))  # fmt: skip

        return finish

    return form


def _method(name: str, prune: Prune | None, elect: bool, normalize: bool, rescale: bool, summary: str,
            **extra: float) -> ModelMethod:  # fmt: skip
    def torch_fn(x: TensorInputs) -> torch.Tensor:
        return generalized_task_arithmetic(x, prune=prune, elect=elect)

    torch_fn.__name__ = torch_fn.__qualname__ = f"_{name}"
    form = gta_form(prune, elect)
    return ModelMethod(
        name, B.with_form(form, torch_fn), base="required", model_params={"weight": None, "density": 1.0, **extra},
        params={"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
        random=prune in (_random, _della), summary=summary, n_models=(0, None), form=form,
        check=della_check if prune is _della else None,
    )  # fmt: skip


MODEL_METHODS = (
    _method("task_arithmetic", None, False, False, False, "θ + λ·Σ w_i·τ_i"),
    _method("ties", _magnitude, True, True, False, "magnitude pruning, sign election, mean of the agreeing entries"),
    _method("dare_linear", _random, False, False, True, "random drop to a density, L1 rescale, weighted sum"),
    _method("dare_ties", _random, True, False, True, "random drop to a density, L1 rescale, TIES sign election"),
    _method("breadcrumbs", _breadcrumbs, False, False, False, "drop the largest γ and the smallest, weighted sum",
            gamma=0.01),
    _method("breadcrumbs_ties", _breadcrumbs, True, False, False, "breadcrumbs pruning, TIES sign election",
            gamma=0.01),
    _method("della", _della, True, True, True, "magnitude-ranked random drop (DELLA), sign election, mean",
            epsilon=0.15),
    _method("della_linear", _della, False, False, True, "magnitude-ranked random drop (DELLA), weighted sum",
            epsilon=0.15),
)  # fmt: skip
