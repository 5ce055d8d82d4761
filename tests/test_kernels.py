"""Triton kernels against the CPU path, bit for bit.

Without a GPU these run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set in conftest before triton
is imported); with a GPU the same tests compile the kernels and run them on it. References are computed independently:
``capmerge.functional`` (torch ops), the native CPU kernel of the engine
(``capmerge.merge.compute``), and plain torch casts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dependency on Linux x86-64 only")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from capmerge import functional as F  # noqa: E402
from capmerge._torch import SAFETENSORS_CODES  # noqa: E402
from capmerge.errors import UsageError  # noqa: E402
from capmerge.kernels.diff import diff  # noqa: E402
from capmerge.kernels.merge import Term, merge  # noqa: E402
from capmerge.kernels.utils import BLOCK, philox_uniform  # noqa: E402
from capmerge.merge import compute  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTS = [torch.float32, torch.bfloat16, torch.float16]
LENGTHS = [0, 1, 7, BLOCK - 1, BLOCK + 1, 4097]
MODE = {"none": compute.PRUNE_NONE, "magnitude": compute.PRUNE_MAGNITUDE, "random": compute.PRUNE_RANDOM,
        "breadcrumbs": compute.PRUNE_BAND}  # fmt: skip


def assert_same(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-identical (NaN where NaN), with the first differences shown."""
    got, ref = got.cpu(), ref.cpu()
    assert got.dtype == ref.dtype and got.shape == ref.shape
    gi = got.reshape(-1).view(torch.int16 if got.element_size() == 2 else torch.int32)
    ri = ref.reshape(-1).view(torch.int16 if ref.element_size() == 2 else torch.int32)
    bad = (gi != ri) & ~(torch.isnan(got.reshape(-1).float()) & torch.isnan(ref.reshape(-1).float()))
    idx = bad.nonzero().reshape(-1)[:5].tolist()
    assert not idx, [(i, float(got.reshape(-1)[i]), float(ref.reshape(-1)[i])) for i in idx]


def rand(n: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype).to(DEV)


# -- Philox: the kernels' uniforms are the CPU stream ------------------------------------------------------------------
@triton.jit
def _rand_kernel(out_ptr, key_lo, key_hi, start, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = (key_hi.to(tl.uint32).to(tl.uint64) << 32) | key_lo.to(tl.uint32).to(tl.uint64)
    tl.store(out_ptr + offs, philox_uniform(seed, start + offs), mask=offs < n)


@pytest.mark.parametrize("start", [0, 2**31 - 100, 2**32 - 101, 2**34 - 98, 2**40 + 5])
def test_kernel_philox_is_functional_philox(start: int) -> None:
    key = F.tensor_key(7, "model.layers.3.mlp.down_proj.weight", 2)
    lo, hi = key & 0xFFFFFFFF, key >> 32
    out = torch.empty(300, dtype=torch.float32, device=DEV)
    _rand_kernel[(1,)](out, lo - (1 << 32) if lo >= 1 << 31 else lo, hi - (1 << 32) if hi >= 1 << 31 else hi,
                       start, 300, BLOCK=512)  # fmt: skip
    ref = F.philox_uniform(key, torch.arange(start, start + 300, dtype=torch.int64))
    assert_same(out, ref)


# -- diff --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", LENGTHS)
def test_diff_lengths(n: int) -> None:
    a, b = rand(n, torch.bfloat16, 1), rand(n, torch.bfloat16, 2)
    assert_same(diff(a, b), (a.float() - b.float()).to(torch.bfloat16))


@pytest.mark.parametrize("da", DTS)
@pytest.mark.parametrize("dout", DTS)
def test_diff_dtypes_match_native(da: torch.dtype, dout: torch.dtype) -> None:
    n = BLOCK + 1
    db = DTS[(DTS.index(da) + 1) % 3]
    a, b = rand(n, da, 3, 100.0), rand(n, db, 4, 100.0)
    a[:4] = torch.tensor([math.inf, -math.inf, math.nan, 65504.0], dtype=da)
    out = torch.empty(n, dtype=dout, device=DEV)
    diff(a, b, out)
    assert_same(out, (a.float() - b.float()).to(dout))
    native = torch.empty(n, dtype=dout)
    ca, cb, co = SAFETENSORS_CODES[da], SAFETENSORS_CODES[db], SAFETENSORS_CODES[dout]
    compute.diff_block(_mv(native), co, _mv(a), ca, _mv(b), cb, n)
    assert_same(out, native)


def _mv(t: torch.Tensor) -> memoryview:
    return memoryview(t.cpu().contiguous().view(torch.uint8).numpy())


# -- merge -------------------------------------------------------------------------------------------------------------
def reference(base, vecs, weights, prune, dens, sign, normalize, alpha, out_dtype, keys, gamma=0.1, offset=0):
    """functional.py: prune each vector, then merge — and the kernel terms with thresholds found independently."""
    pruned, terms = [], []
    for v, w, d, key in zip(vecs, weights, dens, keys, strict=True):
        if prune == "magnitude":
            thr = F.magnitude_threshold(v, d)
            pruned.append(F.magnitude_prune(v, threshold=thr))
            terms.append(Term(v, None, w, MODE[prune], thr, 0.0, key))
        elif prune == "random":
            pruned.append(F.random_prune(v, d, key=key, offset=offset))
            terms.append(Term(v, None, w, MODE[prune], d, d, key))
        elif prune == "breadcrumbs":
            lo, hi = F.breadcrumbs_thresholds(v, d, gamma)
            pruned.append(F.breadcrumbs_prune(v, d, gamma))
            terms.append(Term(v, None, w, MODE[prune], lo, hi, key))
        else:
            pruned.append(v)
            terms.append(Term(v, None, w))
    ref = F.merge(base, pruned, weights, alpha=alpha, sign=sign, normalize=normalize, out_dtype=out_dtype)
    return ref, terms


SIGNS = [("none", False), ("none", True), ("total", False), ("total", True), ("frequency", False)]


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("prune", ["none", "magnitude", "random", "breadcrumbs"])
@pytest.mark.parametrize("sign,normalize", SIGNS)
def test_merge_matches_functional_and_native(k: int, prune: str, sign: str, normalize: bool) -> None:
    case = k * 100 + list(MODE).index(prune) * 10 + SIGNS.index((sign, normalize))
    bd, vd, od = DTS[case % 3], DTS[(case // 3) % 3], DTS[(case // 9) % 3]  # every dtype in every role somewhere
    n = BLOCK + 1
    base = rand(n, bd, case)
    vecs = [rand(n, vd, case + 1 + i, 0.05) for i in range(k)]
    vecs[0][:3] = 0.0  # zeros never agree in a sign election
    weights = [0.5, 1.0, 0.3, -0.2, 0.8][:k]
    dens = [0.3, 0.7, 0.5, 0.2, 0.9][:k]
    keys = [F.tensor_key(11, "w", i) for i in range(k)]
    ref, terms = reference(base, vecs, weights, prune, dens, sign, normalize, 0.7, od, keys, offset=4096)
    out = torch.empty(n, dtype=od, device=DEV)
    merge([out], [0.7], base, terms, sign=sign, normalize=normalize, offset=4096)
    if prune != "random":
        assert_same(out, ref)
    # the engine's native kernel on the same terms
    native = torch.empty(n, dtype=od)
    nterms = [(_mv(t.a), SAFETENSORS_CODES[vd], None, "F32", t.weight, t.mode, t.p1, t.p2, t.key) for t in terms]
    compute.merge_block([(_mv(native), SAFETENSORS_CODES[od], 0.7)], _mv(base),
                        SAFETENSORS_CODES[bd], n, nterms, sign=sign, normalize=normalize, offset=4096)  # fmt: skip
    assert_same(out, native)
    if prune == "random":
        assert_same(out, ref)


@pytest.mark.parametrize("n", LENGTHS)
def test_merge_lengths_ties(n: int) -> None:
    base = rand(n, torch.bfloat16, 5)
    vecs = [rand(n, torch.bfloat16, 6 + i, 0.1) for i in range(2)]
    dens = [0.4, 0.6]
    ref, terms = reference(base, vecs, [1.0, 0.5], "magnitude" if n else "none", dens, "total", True, 1.0,
                           torch.bfloat16, [1, 2])  # fmt: skip
    out = torch.empty(n, dtype=torch.bfloat16, device=DEV)
    merge([out], [1.0], base, terms, sign="total", normalize=True)
    assert_same(out, ref)


def test_merge_pair_terms_sweep_and_in_place() -> None:
    """τ = A − S computed in the kernel, two α outputs in one pass, and out = base (in place)."""
    n = 2 * BLOCK + 3
    base, a, s = rand(n, torch.bfloat16, 1), rand(n, torch.float16, 2), rand(n, torch.float32, 3)
    tau = a.float() - s.float()
    o1, o2 = torch.empty(n, dtype=torch.float32, device=DEV), torch.empty(n, dtype=torch.bfloat16, device=DEV)
    merge([o1, o2], [0.5, -1.0], base, [Term(a, s, 0.8)])
    assert_same(o1, F.merge(base, [tau], [0.8], alpha=0.5, out_dtype=torch.float32))
    assert_same(o2, F.merge(base, [tau], [0.8], alpha=-1.0, out_dtype=torch.bfloat16))
    expect = F.merge(base, [a], [1.0], alpha=0.25)
    merge([base], [0.25], base, [Term(a)])
    assert_same(base, expect)


def test_merge_no_terms_is_a_cast_and_nonfinite_passes_through() -> None:
    base = rand(9, torch.float32, 1)
    base[:3] = torch.tensor([-0.0, math.nan, 1e30])
    out = torch.empty(9, dtype=torch.float16, device=DEV)
    merge([out], [1.0], base, [])
    assert_same(out, base.to(torch.float16))
    assert math.copysign(1.0, float(out[0])) < 0


def test_launchers_validate_their_arguments() -> None:
    a = rand(8, torch.float32, 1)
    with pytest.raises(UsageError, match="dtype torch.float64"):
        diff(a.double(), a.double())
    with pytest.raises(UsageError, match="contiguous"):
        diff(rand(16, torch.float32, 1)[::2], a)
    with pytest.raises(UsageError, match="7 elements, expected 8"):
        diff(a, a[:7])
    with pytest.raises(UsageError, match="at most 8 vectors"):
        merge([a], [1.0], a, [Term(a)] * 9)
    with pytest.raises(UsageError, match="2 outputs for 1 alphas"):
        merge([a, a], [1.0], a, [Term(a)])
    if DEV == "cpu" and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            with pytest.raises(UsageError, match="must be on a CUDA device"):
                diff(a, a)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


# -- compiled for a real GPU (no GPU needed: Triton compiles to PTX/cubin ahead of time) ----------------------------
AOT_SCRIPT = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from capmerge.kernels.merge import _merge_kernel
from capmerge.kernels.diff import _diff_kernel

def compile_(fn, sig, consts):
    names = fn.arg_names
    attrs = {}  # what the launcher's specialisation gives 16-byte aligned pointers and a length divisible by 16
    for a, v in sig.items():
        i = names.index(a)
        for j, e in enumerate(v if isinstance(v, tuple) else (v,)):
            if e.startswith("*") or a == "n":
                attrs[(i, j) if isinstance(v, tuple) else (i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False, "num_warps": 4})
    return c.asm["ptx"], len(c.asm["cubin"])

res = {}
for name, k, modes, sign, norm, nout in json.loads(sys.argv[1]):
    sig = {"OUTS": ("*bf16",) * nout, "ALPHAS": ("fp32",) * nout, "base_ptr": "*bf16", "A": ("*bf16",) * k,
           "B": ("*bf16",) * k, "W": ("fp32",) * k, "P1": ("fp32",) * k, "P2": ("fp32",) * k, "keys_ptr": "*i32",
           "n": "i64", "offset": "i64"}
    consts = {"NOUT": nout, "K": k, "HAS_B": (False,) * k, "MODES": tuple(modes), "SIGN": sign, "NORMALIZE": norm,
              "BLOCK": 1024}
    res[name] = compile_(_merge_kernel, {**sig, **{c: "constexpr" for c in consts}}, consts)
res["diff"] = compile_(_diff_kernel, {"out_ptr": "*bf16", "a_ptr": "*fp16", "b_ptr": "*fp32", "n": "i64",
                                      "BLOCK": "constexpr"}, {"BLOCK": 1024})
print(json.dumps(res))
"""


def test_kernels_compile_for_sm90_without_fma_and_with_wide_loads() -> None:
    """The real-GPU build of the kernels: products and sums rounded separately (no fma), IEEE division (div.rn),
    16-byte vector loads of bfloat16 — checked in the PTX Triton emits for an H100 (compiled here, no GPU needed)."""
    cases = [["k1", 1, [0], 0, False, 1], ["ties3", 3, [1, 1, 1], 1, True, 1], ["dare3", 3, [2, 2, 2], 1, False, 2],
             ["band8", 8, [3] * 8, 2, True, 1]]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                       env=env, timeout=600, cwd=Path(__file__).parent)  # fmt: skip
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("this triton build has no ptxas")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name, (ptx, cubin_size) in res.items():
        assert cubin_size > 0, name
        assert "fma." not in ptx, name
        assert "div.full" not in ptx and "div.approx" not in ptx, name
        assert "ld.global.v4.b32" in ptx, name
    assert "div.rn.f32" in res["ties3"][0] and "div.rn.f32" in res["dare3"][0]
