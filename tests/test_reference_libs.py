"""capmerge's merges against two independent implementations: PEFT's ``peft.utils.merge_utils`` and mergekit.

Everything goes through capmerge's real streaming path (safetensors files in, ``capmerge.apply`` or the CLI, safetensors
files out, read back with the safetensors library). The data are tie-free by construction — every |τ| within a tensor
is a distinct multiple of 2⁻²⁰ — so "the k largest magnitudes" is one well-defined set in every implementation, and
base + τ is exact in float32, so mergekit's τ = A − P is exactly the τ written.

Where the definitions differ, the comparison is restricted to the case where they coincide (each test says how).
mergekit is LGPL: it is only ever run as a separate process from ``.venv-mergekit`` (``make mergekit-venv``).
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import load_any, save_single
from mergekit_ref import (
    OFFLINE_ENV,
    llama_tensors,
    mergekit_config,
    require_mergekit,
    save_hf,
    start_mergekit,
    tie_free,
    wait_mergekit,
)
from safetensors.torch import load_file

import capmerge
from capmerge import functional as F

# d·n is an integer for d ∈ {0.25, 0.5, 0.75} and every shape: PEFT keeps int(d·n), mergekit max(1, int(d·n)),
# capmerge max(1, ⌊d·n + ½⌋) — equal exactly when d·n is integral. "big" spans two of the engine's 2 Mi-element
# blocks (threshold histograms and Philox offsets across a block boundary).
SHAPES = {"layers.0.w": (48, 64), "layers.0.b": (40,), "layers.1.c": (8, 16, 4), "big": (1028, 2052)}
WEIGHTS = [0.7, -0.3, 1.25]


def tie_free_16(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """n consecutive bf16/fp16 magnitudes (consecutive bit patterns) in random order, random signs."""
    n = math.prod(shape)
    start = 0x3400 if dtype == torch.bfloat16 else 0x2000  # bf16 2⁻²³ .., fp16 2⁻⁷ .. (n ≤ 3072: below 2)
    mags = (torch.randperm(n, generator=gen) + start).to(torch.int16).view(dtype)
    signs = torch.randint(0, 2, (n,), generator=gen).to(dtype) * 2 - 1
    return (mags * signs).reshape(shape)


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in units in the last place of their dtype (the distance between their ordered bit patterns)."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits, mask = (torch.int32, 0x7FFFFFFF) if x.dtype == torch.float32 else (torch.int16, 0x7FFF)
        i = x.contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & mask), i)

    return (ordered(a) - ordered(b)).abs()


def assert_ulp(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], max_ulp: int, what: str) -> None:
    assert sorted(got) == sorted(ref), f"{what}: names differ: {sorted(got)} vs {sorted(ref)}"
    for name in ref:
        g, r = got[name], ref[name]
        assert g.shape == r.shape and g.dtype == r.dtype, f"{what} {name}: {g.shape}/{g.dtype} vs {r.shape}/{r.dtype}"
        d = ulp_diff(g, r).reshape(-1)
        if d.numel() and int(d.max()) > max_ulp:
            i = int(d.argmax())
            raise AssertionError(
                f"{what} {name}: {int((d > max_ulp).sum())} of {d.numel()} elements differ by more than {max_ulp} "
                f"ulp; worst at flat index {i}: capmerge {g.reshape(-1)[i].item()!r}, reference "
                f"{r.reshape(-1)[i].item()!r} ({int(d[i])} ulp)"
            )


# ------------------------------------------------------------------------------------------------------------- PEFT
@dataclass
class Data:
    base: dict[str, torch.Tensor]
    vecs: list[dict[str, torch.Tensor]]
    base_path: Path
    vec_paths: list[Path]
    zero_path: Path  # base of zeros: the output is δ itself
    pos_path: Path  # |τ_0|: a vector with a clearly nonzero mean (DARE statistics)
    tmp: Path


@pytest.fixture(scope="module")
def mu():
    return pytest.importorskip("peft.utils.merge_utils", reason="peft not installed (it is in the dev extra)")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    tmp = tmp_path_factory.mktemp("peft")
    gen = torch.Generator().manual_seed(1234)
    base = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    vecs = [{n: tie_free(s, gen) for n, s in SHAPES.items()} for _ in range(3)]
    return Data(
        base,
        vecs,
        save_single(tmp / "base.safetensors", base),
        [save_single(tmp / f"v{i}.safetensors", v) for i, v in enumerate(vecs)],
        save_single(tmp / "zero.safetensors", {n: torch.zeros(s) for n, s in SHAPES.items()}),
        save_single(tmp / "pos.safetensors", {n: t.abs() for n, t in vecs[0].items()}),
        tmp,
    )


def run_apply(data: Data, name: str, *, base: Path | None = None, vectors: list[Path] | None = None, **kw):
    out = data.tmp / f"{name}.safetensors"
    capmerge.apply(base or data.base_path, vectors or data.vec_paths, out, alpha=1.0, force=True, **kw)
    return load_file(str(out))


def reference(data: Data, fn) -> dict[str, torch.Tensor]:
    """base + fn(list of the three τ of a tensor), in float32 (capmerge with α = 1 rounds θ + 1·δ once)."""
    return {n: data.base[n] + fn(n, [v[n] for v in data.vecs]) for n in SHAPES}


def test_task_arithmetic_matches_peft(data: Data, mu) -> None:
    # Identical definitions: δ = Σ w_i·τ_i, any weights.
    got = run_apply(data, "ta", method="task_arithmetic", weights=WEIGHTS)
    ref = reference(data, lambda n, ts: mu.task_arithmetic(ts, torch.tensor(WEIGHTS)))
    assert_ulp(got, ref, 1, "task_arithmetic")


@pytest.mark.parametrize("density", [0.25, 0.5, (0.25, 0.5, 0.75)])
def test_magnitude_matches_peft(data: Data, mu, density) -> None:
    # PEFT keeps the top int(d·n) (topk; ties broken arbitrarily), capmerge |τ| ≥ v_k with k = max(1, ⌊d·n + ½⌋):
    # the same set here (d·n integral, no ties). PEFT has one density for all vectors; per-vector densities are
    # compared with PEFT's prune() applied to each vector, then its task_arithmetic().
    dens = list(density) if isinstance(density, tuple) else [density] * 3
    got = run_apply(data, "mag", method="magnitude", weights=WEIGHTS, density=dens)

    def peft(n: str, ts: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(density, float):
            return mu.magnitude_prune(ts, torch.tensor(WEIGHTS), density)
        pruned = [mu.prune(t, d, method="magnitude") for t, d in zip(ts, dens, strict=True)]
        return mu.task_arithmetic(pruned, torch.tensor(WEIGHTS))

    ref = reference(data, peft)
    assert_ulp(got, ref, 1, f"magnitude d={density}")
    for n in SHAPES:  # the pruning really happened: exactly k entries of each vector survive
        k = int(dens[0] * data.vecs[0][n].numel())
        assert int((F.magnitude_prune(data.vecs[0][n], dens[0]) != 0).sum()) == k


@pytest.mark.parametrize("density", [0.25, 0.5])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_matches_peft(data: Data, mu, sign: str, density: float) -> None:
    # PEFT's ties differs from capmerge's (= mergekit's) in two places: it elects signs from the *unweighted* Σ τ̃_i
    # (``total``), and it divides by the number of agreeing vectors instead of Σ w_i·m_i. With unit weights both
    # definitions coincide: capmerge ties (magnitude prune, sign election, normalize) == PEFT ties.
    got = run_apply(data, f"ties-{sign}", method="ties", sign=sign, density=density)
    ref = reference(data, lambda n, ts: mu.ties(ts, torch.ones(3), density, majority_sign_method=sign))
    assert_ulp(got, ref, 1, f"ties sign={sign} d={density}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_checkpoints_match_peft(tmp_path: Path, mu, dtype: torch.dtype) -> None:
    # capmerge widens 16-bit inputs to float32, merges and rounds once; PEFT on the widened tensors, rounded once here,
    # is the same computation. (capmerge finds 16-bit magnitude thresholds with a one-pass histogram, float32 ones
    # with two: another code path than the float32 tests above.) Tie-free needs n ≤ ~3000 distinct 16-bit values.
    gen = torch.Generator().manual_seed(5)
    shapes = {n: s for n, s in SHAPES.items() if n != "big"}
    base = {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}
    vecs = [{n: tie_free_16(s, dtype, gen) for n, s in shapes.items()} for _ in range(3)]
    paths = [save_single(tmp_path / f"v{i}.safetensors", v) for i, v in enumerate(vecs)]
    base_path = save_single(tmp_path / "base.safetensors", base)
    cases = {
        "magnitude": ({"weights": WEIGHTS}, lambda ts: mu.magnitude_prune(ts, torch.tensor(WEIGHTS), 0.25)),
        "ties": ({}, lambda ts: mu.ties(ts, torch.ones(3), 0.25)),
    }
    for method, (kw, peft) in cases.items():
        out = tmp_path / f"{method}.safetensors"
        capmerge.apply(base_path, paths, out, method=method, density=0.25, **kw)
        ref = {n: (base[n].float() + peft([v[n].float() for v in vecs])).to(dtype) for n in shapes}
        assert_ulp(load_file(str(out)), ref, 1, f"{method} {dtype}")


# DARE. The generators differ (PEFT: torch.bernoulli; capmerge: counter-based Philox of (seed, tensor, vector index)),
# so the arithmetic is compared exactly by handing PEFT capmerge's masks, computed independently of the streaming path
# with capmerge.functional, and the masks themselves by their statistics.
DARE_SEED, DARE_DENSITY = 7, 0.3


@functools.cache
def functional_mask(name: str, index: int, seed: int = DARE_SEED) -> torch.Tensor:
    """1.0 where capmerge keeps element j of vector ``index`` of tensor ``name`` (cached: ~1 s for "big")."""
    kept = F.random_prune(torch.ones(SHAPES[name]), DARE_DENSITY, key=F.tensor_key(seed, name, index), rescale=False)
    return (kept != 0).to(torch.float32)


@pytest.fixture
def bernoulli_from_capmerge(monkeypatch: pytest.MonkeyPatch, data: Data):
    """PEFT's random_pruning draws torch.bernoulli(full_like(τ, d)) once per τ, in order: serve capmerge's masks."""
    queue: list[torch.Tensor] = []

    def fake_bernoulli(p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        assert not args and not kwargs and float(p.reshape(-1)[0]) == pytest.approx(DARE_DENSITY)
        m = queue.pop(0)
        assert m.shape == p.shape
        return m.to(p.dtype)

    def fill(name: str) -> None:
        assert not queue
        queue.extend(functional_mask(name, i) for i in range(len(data.vecs)))

    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    return fill


def test_dare_linear_matches_peft_given_the_same_masks(data: Data, mu, bernoulli_from_capmerge) -> None:
    # Same definition (τ̃ = mask·τ / d, δ = Σ w_i·τ̃_i), any weights.
    got = run_apply(data, "dare-linear", method="dare_linear", weights=WEIGHTS, density=DARE_DENSITY, seed=DARE_SEED)

    def peft(n: str, ts: list[torch.Tensor]) -> torch.Tensor:
        bernoulli_from_capmerge(n)
        return mu.dare_linear(ts, torch.tensor(WEIGHTS), DARE_DENSITY)

    assert_ulp(got, reference(data, peft), 1, "dare_linear")


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_dare_ties_matches_peft_given_the_same_masks(data: Data, mu, bernoulli_from_capmerge, sign: str) -> None:
    # PEFT's dare_ties always divides by the count of agreeing vectors (capmerge's / mergekit's dare_ties does not
    # normalize) and elects from unweighted sums: it equals capmerge dare_ties with normalize=True and unit weights.
    got = run_apply(data, f"dare-ties-{sign}", method="dare_ties", sign=sign, normalize=True, density=DARE_DENSITY,
                    seed=DARE_SEED)  # fmt: skip

    def peft(n: str, ts: list[torch.Tensor]) -> torch.Tensor:
        bernoulli_from_capmerge(n)
        return mu.dare_ties(ts, torch.ones(3), DARE_DENSITY, majority_sign_method=sign)

    assert_ulp(got, reference(data, peft), 1, f"dare_ties sign={sign}")


def dare_stats_ok(tau: torch.Tensor, pruned: torch.Tensor, d: float, *, rescaled: bool) -> list[str]:
    """Kept fraction within 4σ of d; mean of the pruned tensor within 4 standard errors of its expectation."""
    n = tau.numel()
    kept = float((pruned != 0).float().mean())
    errs = []
    if abs(kept - d) > 4 * math.sqrt(d * (1 - d) / n):
        errs.append(f"kept fraction {kept:.5f}, expected {d} ± {4 * math.sqrt(d * (1 - d) / n):.5f}")
    t = tau.double()
    want = float(t.mean()) if rescaled else d * float(t.mean())
    var = (t**2).sum() * ((1 - d) / d if rescaled else d * (1 - d))
    se = float(var.sqrt()) / n
    if abs(float(pruned.double().mean()) - want) > 4 * se:
        errs.append(f"mean {float(pruned.double().mean()):.6g}, expected {want:.6g} ± {4 * se:.3g}")
    return errs


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_statistics_capmerge_and_peft(data: Data, mu, rescale: bool) -> None:
    tau = load_file(str(data.pos_path))
    got = run_apply(data, f"dare-stats-{rescale}", base=data.zero_path, vectors=[data.pos_path],
                    method="dare_linear", density=DARE_DENSITY, seed=DARE_SEED, rescale=rescale)  # fmt: skip
    torch.manual_seed(0)
    problems = []
    for n in ("layers.0.w", "big"):
        for who, pruned in (("capmerge", got[n]), ("peft", mu.random_pruning(tau[n], DARE_DENSITY, rescale=rescale))):
            problems += [f"{who} {n}: {e}" for e in dare_stats_ok(tau[n], pruned, DARE_DENSITY, rescaled=rescale)]
        kept = got[n] != 0  # kept entries are τ/d (or τ) exactly
        expect = tau[n] / torch.tensor(DARE_DENSITY) if rescale else tau[n]
        assert torch.equal(got[n][kept], expect[kept])
    assert not problems, problems


def test_dare_is_deterministic_and_seeded(data: Data) -> None:
    kw = {"method": "dare_linear", "density": DARE_DENSITY, "base": data.zero_path, "vectors": [data.pos_path]}
    outs = []
    for name, seed in (("dare-s3a", 3), ("dare-s3b", 3), ("dare-s4", 4)):
        run_apply(data, name, seed=seed, **kw)
        outs.append((data.tmp / f"{name}.safetensors").read_bytes())
    assert outs[0] == outs[1], "same seed, same inputs: the output bytes must be identical"
    a, b = load_file(str(data.tmp / "dare-s3a.safetensors")), load_file(str(data.tmp / "dare-s4.safetensors"))
    for n in SHAPES:
        same = float(((a[n] != 0) == (b[n] != 0)).float().mean())
        # independent masks agree on d² + (1 − d)² = 0.58 of the entries; identical ones on all
        assert same < 0.75 or a[n].numel() < 100, f"{n}: seeds 3 and 4 give masks agreeing on {same:.1%}"
        assert not torch.equal(a[n] != 0, b[n] != 0), n
        assert torch.equal(a[n] != 0, functional_mask(n, 0, seed=3).bool())


# --------------------------------------------------------------------------------------------------------- mergekit
MK_WEIGHTS = [0.6, 0.3, 0.9]
MK_DENSITIES = [0.25, 0.5, 0.75]  # d·n integral for every tensor (n ∈ {64, 4096, 8192, 16384})
TA_LAMBDA = 0.7
GAMMA = 1 / 64  # γ·n integral too: mergekit drops int(γ·n) outliers, capmerge ⌊γ·n + ½⌋


@pytest.fixture(scope="module")
def mergekit_runs(tmp_path_factory: pytest.TempPathFactory):
    """P and A1..A3 (tiny float32 Llama, A_i = P + τ_i exactly); mergekit ties and task_arithmetic (one process)."""
    require_mergekit()
    tmp = tmp_path_factory.mktemp("mergekit")
    gen = torch.Generator().manual_seed(99)
    shapes = llama_tensors()
    # P on a 2⁻¹² grid in [-0.5, 0.5] (norm weights around 1), τ on the 2⁻²⁰ grid with |τ| ≤ 2⁻⁶: A = P + τ and
    # A − P are exact in float32 (≤ 21 significant bits).
    p = {n: torch.randint(-2048, 2049, s, generator=gen).float() / 4096 + (1.0 if len(s) == 1 else 0.0)
         for n, s in shapes.items()}  # fmt: skip
    taus = [{n: tie_free(s, gen) for n, s in shapes.items()} for _ in range(3)]
    pdir = save_hf(tmp / "P", p)
    adirs = [save_hf(tmp / f"A{i + 1}", {n: p[n] + t[n] for n in shapes}) for i, t in enumerate(taus)]
    for a, t in zip(adirs, taus, strict=True):  # the construction really is exact
        assert all(torch.equal(load_any(a)[n] - p[n], t[n]) for n in shapes)
    pruned = [{"weight": w, "density": d} for w, d in zip(MK_WEIGHTS, MK_DENSITIES, strict=True)]
    cases = {
        "ties": mergekit_config("ties", list(zip(adirs, pruned, strict=True)), base=pdir,
                                parameters={"normalize": True}),
        "breadcrumbs_ties": mergekit_config("breadcrumbs_ties", [(a, {**x, "gamma": GAMMA}) for a, x in
                                            zip(adirs, pruned, strict=True)], base=pdir,
                                            parameters={"normalize": False}),
        "task_arithmetic": mergekit_config("task_arithmetic", [(a, {"weight": w}) for a, w in
                                           zip(adirs, MK_WEIGHTS, strict=True)], base=pdir,
                                           parameters={"normalize": False, "lambda": TA_LAMBDA}),
    }  # fmt: skip
    wait_mergekit(start_mergekit(cases, tmp))
    return {"tmp": tmp, "P": pdir, "A": adirs, "p": p, "taus": taus}


def capmerge_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "capmerge", "apply", *args, "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV}, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "task_arithmetic"])
def test_matches_mergekit(mergekit_runs, method: str) -> None:
    # Same definitions in float32: mergekit prunes each τ_i = A_i − P to its top max(1, int(d·n)) (integral here;
    # breadcrumbs first drops the int(γ·n) largest), multiplies by w_i, elects + where Σ w_i·τ̃_i ≥ 0, sums the
    # agreeing terms and, for ties (normalize: true), divides by Σ w_i·m_i; task_arithmetic is λ·Σ w_i·τ_i
    # (normalize: false), λ being capmerge's α.
    r = mergekit_runs
    out = r["tmp"] / f"cm-{method}"
    args = [str(r["P"]), *(x for a in r["A"] for x in ("--add", str(a))), "-o", str(out)]
    args += ["--weights", ",".join(map(str, MK_WEIGHTS)), "--dtype", "float32"]
    if method != "task_arithmetic":
        args += ["--method", method, "--density", ",".join(map(str, MK_DENSITIES))]
        args += ["--gamma", str(GAMMA)] if method == "breadcrumbs_ties" else []
    else:
        args += ["--method", "task_arithmetic", "--alpha", str(TA_LAMBDA)]
    capmerge_cli(*args)
    got, mk = load_any(out), load_any(r["tmp"] / f"mk-{method}")
    assert_ulp(got, mk, 1, f"{method} vs mergekit")
    # the merge did something, and ties pruned: an entry stays at P only when every vector's entry was pruned
    changed = sum(int((t != r["p"][n]).sum()) for n, t in got.items()) / sum(t.numel() for t in got.values())
    assert changed > 0.99 if method == "task_arithmetic" else 0.75 < changed < 0.95, changed
