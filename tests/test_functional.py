"""The reference math of capmerge.functional on hand-made cases, and Philox against Triton's tl.rand."""

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
@pytest.mark.parametrize("start", [0, 2**32 - 5])
def test_philox_native_equals_torch(key: int, start: int) -> None:
    from capmerge import _native

    out = bytearray(4096 * 4)
    _native.philox(key, start, 4096, out)
    got = torch.frombuffer(out, dtype=torch.float32)
    ref = F.philox_uniform(key, torch.arange(start, start + 4096, dtype=torch.int64))
    assert torch.equal(got, ref)
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0


TRITON_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton, triton.language as tl

    @triton.jit
    def rand_kernel(out_ptr, seed, start, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tl.rand(seed, start + i.to(tl.int64)))

    res = {}
    for key, start in json.loads(sys.argv[1]):
        out = torch.empty(256, dtype=torch.float32)
        rand_kernel[(1,)](out, key, start, N=256)
        res[f"{key},{start}"] = out.tolist()
    print(json.dumps(res))
    """
)


def test_philox_matches_triton_tl_rand() -> None:
    """The CPU stream is bit-for-bit Triton's tl.rand (run under the Triton interpreter)."""
    pytest.importorskip("triton", reason="triton is a dependency on Linux x86-64 only")
    import json

    cases = [(1234, 0), (2**40 + 3, 2**32 - 100), (F.tensor_key(0, "model.layers.0.mlp.up_proj.weight", 1), 4096)]
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key, start in cases:
        ref = F.philox_uniform(key, torch.arange(start, start + 256, dtype=torch.int64))
        got = torch.tensor(res[f"{key},{start}"], dtype=torch.float32)
        assert torch.equal(got, ref), (key, start, (got != ref).nonzero()[:5])
