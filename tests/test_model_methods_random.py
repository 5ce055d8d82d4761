"""The random model methods (dare_linear, dare_ties, della, della_linear), statistically.

Their masks come from capmerge's counter-based Philox stream keyed by (seed, tensor name, model index), mergekit's from
torch.bernoulli, so outputs cannot be compared element by element (tests/test_model_methods.py compares everything
else with mergekit at density 1). Here: the kept fraction is the density within binomial bounds, ``rescale`` scales
the kept entries exactly to the L1 norm of the unpruned task vector (mergekit 0.1.5's rescale), DELLA keeps larger
magnitudes more often with the documented probabilities, and the masks are deterministic for a seed and independent
across seeds, tensors and models.
"""

from __future__ import annotations

import math

import pytest
import torch

from capmerge import functional as F
from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import TensorInputs
from capmerge.merge.methods.registry import get_model_method

N = 60_000


@pytest.fixture(scope="module")
def tau() -> torch.Tensor:
    """Distinct magnitudes (no ties in DELLA's ranks), random signs, in random order: a (300, 200) tensor."""
    g = torch.Generator().manual_seed(11)
    mags = (torch.randperm(N, generator=g) + 1).float() / N
    return (mags * (torch.randint(0, 2, (N,), generator=g) * 2 - 1)).reshape(300, 200)


def run(method: str, taus: list[torch.Tensor], *, name: str = "t", seed: int = 0, weights: list[float] | None = None,
        params: dict[str, object] | None = None, **mp: object) -> torch.Tensor:  # fmt: skip
    """fn on base 0 and models τ_i: the output is δ itself."""
    m = get_model_method(method)
    w = weights or [1.0] * len(taus)
    gp, mps = m.resolve(params or {}, [{"weight": wi, **mp} for wi in w])
    return m.fn(TensorInputs(name, taus, mps, gp, torch.zeros_like(taus[0]), seed))


def binomial_ok(kept: torch.Tensor, p: float) -> tuple[bool, str]:
    n = kept.numel()
    frac = float(kept.float().mean())
    bound = 5 * math.sqrt(p * (1 - p) / n)
    return abs(frac - p) <= bound, f"kept {frac:.5f}, expected {p} ± {bound:.5f}"


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
def test_kept_fraction_and_l1_rescale(tau: torch.Tensor, method: str, density: float) -> None:
    out = run(method, [tau], density=density, seed=3)
    kept = out != 0
    ok, msg = binomial_ok(kept, density)
    assert ok, f"{method} d={density}: {msg}"
    # rescale: every kept entry is τ·c with one c = ‖τ‖₁ / ‖τ·mask‖₁ (the norms summed in float64, then float32)
    c = tau.abs().double().sum().float() / torch.where(kept, tau, 0).abs().double().sum().float()
    assert torch.equal(out[kept], tau[kept] * c)
    assert not out[~kept].any()
    # E‖τ·mask‖₁ = Σ p_j·|τ_j|: c ≈ 1/d for DARE (the paper's factor), less for DELLA (it keeps the larger |τ|)
    p = torch.full_like(tau, density) if method == "dare_linear" else F.della_probabilities(tau, density, 0.15)
    assert float(c) == pytest.approx(float(tau.abs().double().sum() / (p.double() * tau.abs()).sum()), rel=0.02)
    # without rescale the kept entries are τ exactly
    raw = run(method, [tau], density=density, seed=3, params={"rescale": False})
    assert torch.equal(raw != 0, kept) and torch.equal(raw[kept], tau[kept])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_deterministic_and_independent(tau: torch.Tensor, method: str) -> None:
    d = 0.5
    a = run(method, [tau], density=d, seed=7)
    assert torch.equal(a, run(method, [tau], density=d, seed=7)), "same seed, same output"
    # independent masks agree on d² + (1 − d)² = ½ of the entries
    for other in (run(method, [tau], density=d, seed=8), run(method, [tau], density=d, seed=7, name="u")):
        same = float(((a != 0) == (other != 0)).float().mean())
        assert abs(same - 0.5) < 0.02, f"{method}: masks of another seed or tensor agree on {same:.1%}"
    # model index: two identical models draw different masks (weights pick one model's term at a time)
    first = run(method, [tau, tau], density=d, seed=7, weights=[1.0, 0.0], params={"normalize": False})
    second = run(method, [tau, tau], density=d, seed=7, weights=[0.0, 1.0], params={"normalize": False})
    assert torch.equal(first != 0, a != 0), "model 0's mask does not depend on the other models"
    same = float(((first != 0) == (second != 0)).float().mean())
    assert abs(same - 0.5) < 0.02, f"{method}: models 0 and 1 masks agree on {same:.1%}"


def test_della_probabilities_by_hand() -> None:
    # |t| = 3, 1, 2: ranks 3, 1, 2 of 3 → p = d − ε + 2ε·(r − 1)/2 = 0.4 + 0.2·(1, 0, ½)
    p = F.della_probabilities(torch.tensor([3.0, -1.0, 2.0]), 0.5, 0.1)
    torch.testing.assert_close(p, torch.tensor([0.6, 0.4, 0.5]))
    # rows rank separately (dim 1); a 3-D tensor ranks along dim 1 too
    p2 = F.della_probabilities(torch.tensor([[1.0, 2.0], [-5.0, 4.0]]), 0.5, 0.1)
    torch.testing.assert_close(p2, torch.tensor([[0.4, 0.6], [0.6, 0.4]]))
    t3 = torch.tensor([[[1.0, 9.0], [2.0, 8.0], [3.0, 7.0]]])  # (1, 3, 2): along dim 1, column 0 rises, column 1 falls
    torch.testing.assert_close(F.della_probabilities(t3, 0.5, 0.1)[0, :, 0], torch.tensor([0.4, 0.5, 0.6]))
    torch.testing.assert_close(F.della_probabilities(t3, 0.5, 0.1)[0, :, 1], torch.tensor([0.6, 0.5, 0.4]))


def test_della_keeps_larger_magnitudes_more_often(tau: torch.Tensor) -> None:
    d, eps = 0.5, 0.2
    out = run("della_linear", [tau], density=d, epsilon=eps, seed=1)
    kept = (out != 0).float()
    order = torch.argsort(tau.abs(), dim=1)  # per row, smallest first
    by_rank = torch.gather(kept, 1, order)  # column j: the entries of rank j + 1
    probs = torch.gather(F.della_probabilities(tau, d, eps), 1, order)
    fractions = []
    for chunk, pchunk in zip(by_rank.chunk(10, dim=1), probs.chunk(10, dim=1), strict=True):  # rank deciles
        p = float(pchunk.mean())
        ok, msg = binomial_ok(chunk, p)
        assert ok, f"rank decile with mean probability {p:.3f}: {msg}"
        fractions.append(float(chunk.mean()))
    assert fractions == sorted(fractions), fractions
    assert fractions[0] == pytest.approx(d - 0.9 * eps, abs=0.03), fractions  # decile means: d ∓ 0.9ε
    assert fractions[-1] == pytest.approx(d + 0.9 * eps, abs=0.03), fractions


def test_della_keep_probability_of_each_rank_and_independence() -> None:
    """Rows of 5 with ties and a NaN: each rank is kept with d − ε + 2ε·r/4 (binomial bounds, 40 000 rows), and two
    entries of a row are kept together with the product of their probabilities (the draws are per entry)."""
    rows, m, d, eps = 40_000, 5, 0.4, 0.3
    g = torch.Generator().manual_seed(2)
    t = torch.randn(rows, m, generator=g)
    t[::7, 3] = t[::7, 1]  # ties: ranked in index order
    t[::11, 2] = float("nan")  # above everything
    keep = F.della_keep(t, d, eps, key=F.tensor_key(0, "rows", 0))
    ranks = F.row_ranks(t.abs())
    want = [d - eps + 2 * eps * r / (m - 1) for r in range(m)]
    for r in range(m):
        ok, msg = binomial_ok(keep[ranks == r], want[r])
        assert ok, f"rank {r}: {msg}"
    lo, top = keep[ranks == 0].reshape(rows), keep[ranks == m - 1].reshape(rows)
    ok, msg = binomial_ok(lo & top, want[0] * want[-1])
    assert ok, f"both the smallest and the largest kept: {msg}"


def test_della_epsilon_must_keep_probabilities_inside_0_1(tau: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"tensor t, model 1: epsilon must be chosen such that density ± epsilon"):
        run("della", [tau], density=0.1)  # default ε = 0.15
    assert torch.equal(run("della", [tau], density=1.0), tau)  # density 1: no pruning, no check (as mergekit)


def test_density_edges(tau: torch.Tensor) -> None:
    for method in ("dare_linear", "della_linear", "ties", "breadcrumbs"):
        assert torch.equal(run(method, [tau], density=1.0), tau), method
        assert not run(method, [tau], density=0.0, **({"epsilon": 0.0} if "della" in method else {})).any(), method
    m = get_model_method("dare_ties")
    gp, _ = m.resolve({}, [])
    base = torch.arange(4.0)
    assert torch.equal(m.fn(TensorInputs("t", [], [], gp, base)), base), "no models: the base"


@pytest.mark.parametrize("shape", [(7,), (64, 33), (3, 5, 4)])
def test_masks_are_the_reference_philox_masks(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """The methods draw from the native kernel on the CPU: the masks of capmerge.functional's pure-torch Philox,
    bit for bit (and the same output without the native kernel)."""
    g = torch.Generator().manual_seed(3)
    base, model = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    name = "model.layers.2.mlp.up_proj.weight"
    tau = model - base
    for method, ref in (
        ("dare_linear", F.random_prune(tau, 0.4, key=F.tensor_key(9, name, 0), rescale=False)),
        ("della_linear", F.della_prune(tau, 0.4, 0.2, key=F.tensor_key(9, name, 0), rescale=False)),
    ):
        m = get_model_method(method)
        mp = {"weight": 1.0, "density": 0.4, **({"epsilon": 0.2} if "della" in method else {})}
        gp, mps = m.resolve({"rescale": False}, [mp])
        x = TensorInputs(name, [model], mps, gp, base, 9)
        native = m.fn(x)
        torch.testing.assert_close(native, base + ref, rtol=0, atol=0)
        monkeypatch.setenv("CAPMERGE_NO_NATIVE", "1")
        assert torch.equal(m.fn(x), native), method
        monkeypatch.delenv("CAPMERGE_NO_NATIVE")


@pytest.mark.parametrize("method", ["della", "della_linear", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("params", [{}, {"normalize": True, "rescale": True}, {"rescale": False, "lambda": 0.7}])
@pytest.mark.parametrize("shape", [(9,), (40, 257)])
def test_block_form_is_the_float32_function(method: str, params: dict, shape: tuple[int, ...]) -> None:
    """The random methods' block form (keep bits from the statistics pass — DELLA's from each row's ranks —, the
    rescale ratio as the bits' scale, so normalize with rescale too) gives the plain float32 function's bits, for
    three models of different densities."""
    from capmerge.merge.methods import gta

    g = torch.Generator().manual_seed(len(shape) + len(params))
    base = torch.randn(shape, generator=g).bfloat16().float()
    models = [(base + 0.01 * torch.randn(shape, generator=g)).bfloat16().float() for _ in range(3)]
    m = get_model_method(method)
    dens = ({"density": 0.3}, {"density": 0.6}, {"density": 1.0})
    gp, mps = m.resolve(params, [{"weight": w, **d} for w, d in zip((0.5, 0.3, 0.4), dens, strict=True)])
    x = TensorInputs("model.layers.0.mlp.up_proj.weight", models, mps, gp, base, 4)
    prune = gta._della if "della" in method else gta._random
    want = gta.generalized_task_arithmetic(x, prune=prune, elect=method in ("della", "dare_ties"))
    assert gta.gta_form(prune, method in ("della", "dare_ties"))(B.spec_of(x)) is not None
    assert torch.equal(m.fn(x), want)
