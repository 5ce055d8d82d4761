"""The reference math of capmerge.functional on hand-made cases, and Philox against Triton's tl.rand4x."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from capmerge import functional as F
from capmerge.merge import compute


def test_keep_count() -> None:
    assert F.keep_count(0.5, 10) == 5
    assert F.keep_count(0.25, 10) == 3  # 2.5 rounds half up
    assert F.keep_count(1e-9, 10) == 1  # a positive density keeps at least one entry
    assert F.keep_count(1.0, 7) == 7 and F.keep_count(0.3, 0) == 0
    with pytest.raises(ValueError):
        F.keep_count(0.0, 10)


def test_magnitude_prune_keeps_ties() -> None:
    t = torch.tensor([1.0, -3.0, 2.0, -2.0, 0.5])
    got = F.magnitude_prune(t, 0.4)  # k = 2: the 2nd largest |t| is 2, and -2 ties with it
    assert got.tolist() == [0.0, -3.0, 2.0, -2.0, 0.0]
    assert F.magnitude_prune(t, 1.0).tolist() == t.tolist()
    assert F.magnitude_prune(t, 0.01).tolist() == [0.0, -3.0, 0.0, 0.0, 0.0]


def test_breadcrumbs() -> None:
    t = torch.arange(1.0, 11.0) * torch.tensor([1.0, -1.0] * 5)
    # n = 10, d = 0.5 -> keep 5; gamma = 0.1 -> drop the single largest (10): keep 5 <= |t| < 10
    assert F.breadcrumbs_thresholds(t, 0.5, 0.1) == (5.0, 10.0)
    assert F.breadcrumbs_prune(t, 0.5, 0.1).abs().tolist() == [0, 0, 0, 0, 5, 6, 7, 8, 9, 0]
    # the outlier cut shrinks when density needs the room: d = 1 keeps everything
    assert F.breadcrumbs_prune(t, 1.0, 0.3).abs().tolist() == list(range(1, 11))


def test_breadcrumbs_gamma_zero_cuts_no_outliers() -> None:
    t = torch.tensor([1.0, -2.0, 3.0, -4.0])
    # n = 4, d = 0.5 -> keep 2; gamma = 0 drops nothing from the top: keep 3 <= |t| (< inf)
    assert F.breadcrumbs_thresholds(t, 0.5, 0.0) == (3.0, float("inf"))
    assert F.breadcrumbs_prune(t, 0.5, 0.0).tolist() == [0.0, 0.0, 3.0, -4.0]
    with pytest.raises(ValueError, match="needs density or threshold"):
        F.magnitude_prune(t)


def test_elect_sign_and_combine() -> None:
    a = torch.tensor([1.0, -2.0, 0.0, 3.0, 1.0])
    b = torch.tensor([-1.0, -1.0, 0.0, -1.0, 0.0])
    assert F.elect_sign([a, b], [1.0, 1.0], "total").tolist() == [1, -1, 1, 1, 1]  # ties (0) elect +
    assert F.elect_sign([a, b], [1.0, 1.0], "frequency").tolist() == [1, -1, 1, 1, 1]
    assert F.elect_sign([a, b], [1.0, 3.0], "total").tolist() == [-1, -1, 1, 1, 1]
    d = F.combine([a, b], [1.0, 1.0], sign="total", normalize=True)
    # index 0: elected + -> only a counts (1/1); 1: both negative -> (-2-1)/2; 2: nothing agrees -> 0 (den 0)
    assert d.tolist() == [1.0, -1.5, 0.0, 3.0, 1.0]
    d = F.combine([a, b], [0.5, 2.0], sign="none", normalize=True)  # divides by the sum of weights everywhere
    assert torch.allclose(d, (0.5 * a + 2.0 * b) / 2.5)


def test_random_prune_statistics_and_determinism() -> None:
    t = torch.ones(200_000)
    key = F.tensor_key(7, "layers.0.w", 0)
    p = F.random_prune(t, 0.3, key=key)
    kept = float((p != 0).float().mean())
    assert abs(kept - 0.3) < 4 * (0.3 * 0.7 / 200_000) ** 0.5
    assert torch.allclose(p[p != 0], torch.full_like(p[p != 0], 1 / 0.3))
    assert torch.equal(p, F.random_prune(t, 0.3, key=key))
    assert not torch.equal(p, F.random_prune(t, 0.3, key=F.tensor_key(8, "layers.0.w", 0)))
    # the offset makes a block of a tensor see the same stream as the whole tensor
    assert torch.equal(F.random_prune(t[1000:2000], 0.3, key=key, offset=1000), p[1000:2000])


@pytest.mark.skipif(not compute.native_available(), reason="native kernel not built")
@pytest.mark.parametrize("key", [0, 12345, 2**40 + 17, 2**64 - 1])
@pytest.mark.parametrize("start", [0, 3, 2**32 - 5, 2**34 - 70])  # 2^34: the counters' high word changes
@pytest.mark.parametrize("path", [0, 1, 2])  # the fastest loop, AVX2, plain C
def test_philox_native_equals_torch(key: int, start: int, path: int) -> None:
    from capmerge import _native

    n = 4096 + 29  # a tail past the vector loops' 32 and 128 elements
    out = bytearray(n * 4)
    _native.philox(key, start, n, out, path)
    got = torch.frombuffer(out, dtype=torch.float32)
    ref = F.philox_uniform(key, torch.arange(start, start + n, dtype=torch.int64))
    assert torch.equal(got, ref)
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0


TRITON_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton, triton.language as tl

    @triton.jit
    def rand4x_kernel(out_ptr, seed, first, N: tl.constexpr):
        i = tl.arange(0, N)
        r0, r1, r2, r3 = tl.rand4x(seed, first + i.to(tl.int64))
        tl.store(out_ptr + i, r0)
        tl.store(out_ptr + N + i, r1)
        tl.store(out_ptr + 2 * N + i, r2)
        tl.store(out_ptr + 3 * N + i, r3)

    res = {}
    for key, first in json.loads(sys.argv[1]):
        out = torch.empty(4 * 128, dtype=torch.float32)
        rand4x_kernel[(1,)](out, key, first, N=128)
        res[f"{key},{first}"] = out.tolist()
    print(json.dumps(res))
    """
)


def test_philox_matches_triton_tl_rand4x() -> None:
    """Element i's uniform is word i % 4 of Triton's tl.rand4x(key, i // 4) (run under the Triton interpreter), bit
    for bit: the four words of each counter laid out one after another."""
    pytest.importorskip("triton", reason="triton is a dependency on Linux x86-64 only")
    import json

    cases = [(1234, 0), (2**40 + 3, 2**34 - 102), (F.tensor_key(0, "model.layers.0.mlp.up_proj.weight", 1), 4098)]
    counters = [(key, start // 4) for key, start in cases]
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, json.dumps(counters)], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for (key, start), (_, first) in zip(cases, counters, strict=True):
        words = torch.tensor(res[f"{key},{first}"], dtype=torch.float32).reshape(4, 128)
        stream = words.t().reshape(-1)  # counter by counter, its words 0..3: elements 4·first, 4·first + 1, ...
        got = stream[start - 4 * first : start - 4 * first + 256]
        ref = F.philox_uniform(key, torch.arange(start, start + 256, dtype=torch.int64))
        assert torch.equal(got, ref), (key, start, (got != ref).nonzero()[:5])


@pytest.mark.parametrize("start", [0, 1, 2, 3, 4097, 2**34 - 6])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 64, 301])
def test_philox_range_is_philox_uniform_of_the_range(start: int, n: int) -> None:
    """The run form (each counter once, its words laid out in order) draws the numbers of the element-wise form."""
    got = F.philox_range(2**40 + 17, start, n)
    ref = F.philox_uniform(2**40 + 17, torch.arange(start, start + n, dtype=torch.int64))
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got, ref)
