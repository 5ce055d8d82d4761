"""The torch path of the block kernels (float64 and float8 data, or no native kernel) against numpy references.

float64 blocks are computed in float64 on this path (capmerge/merge/compute.py: "float64 when any input or the output
is float64"), so a float64 reference computed by numpy in the same order must match bit for bit. Found by the mutation
run (docs/reliability.md, "Reliability figures"): the native kernel serves float32/float16/bfloat16 everywhere else,
and nothing checked which dtype this path computes in, nor its overflow flags.
"""

from __future__ import annotations

import numpy as np
import pytest

from capmerge.merge import compute


def _buf(a: np.ndarray) -> memoryview:
    return memoryview(bytearray(np.ascontiguousarray(a).tobytes()))


def _term(buf: memoryview, code: str, w: float, *, mode: int = compute.PRUNE_NONE, p1: float = 0.0,
          p2: float = 0.0, key: int = 0) -> tuple:  # fmt: skip
    return (buf, code, None, code, w, mode, p1, p2, key)


def _data(n: int = 257) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.standard_normal(n), rng.standard_normal(n) * 0.1, rng.standard_normal(n) * 0.1


def _where(got: np.ndarray, ref: np.ndarray) -> str:
    bad = np.flatnonzero(got != ref)
    return f"{bad.size} differ, first at {bad[:3]}: {got[bad[:3]]} vs {ref[bad[:3]]}"


@pytest.mark.parametrize(("base_code", "vec_code"), [("F32", "F64"), ("F64", "F32"), ("F32", "F32")])
def test_merge_computes_in_float64_when_any_input_or_the_output_is_float64(base_code: str, vec_code: str) -> None:
    """θ + α·(w1·v1 + w2·v2), output F64: numpy float64 in the same order ((0 + w1·v1) + w2·v2), with weights and α
    that float32 cannot hold (0.1, 0.7, 0.3), so a float32 step anywhere shows."""
    np_dt = {"F32": np.float32, "F64": np.float64}
    b, v1, v2 = _data()
    b, v1, v2 = b.astype(np_dt[base_code]), v1.astype(np_dt[vec_code]), v2.astype(np_dt[vec_code])
    out = bytearray(b.size * 8)
    terms = [_term(_buf(v1), vec_code, 0.1), _term(_buf(v2), vec_code, 0.7)]
    compute.merge_block([(memoryview(out), "F64", 0.3)], _buf(b), base_code, b.size, terms)
    got = np.frombuffer(bytes(out), dtype=np.float64)
    d = (0.0 + 0.1 * v1.astype(np.float64)) + 0.7 * v2.astype(np.float64)
    ref = b.astype(np.float64) + 0.3 * d
    assert np.array_equal(got, ref), _where(got, ref)


def test_diff_computes_in_float64_when_one_input_is_float64() -> None:
    _, a, b = _data()
    a32 = a.astype(np.float32)
    out = bytearray(a.size * 8)
    compute.diff_block(memoryview(out), "F64", _buf(a32), "F32", _buf(b), "F64", a.size)
    got = np.frombuffer(bytes(out), dtype=np.float64)
    ref = a32.astype(np.float64) - b
    assert np.array_equal(got, ref), _where(got, ref)


@pytest.fixture(params=["native", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch":
        monkeypatch.setenv("CAPMERGE_NO_NATIVE", "1")
    elif not compute.native_available():
        pytest.skip("native kernel not built")
    return request.param


def test_flags_on_both_paths(path: str) -> None:
    """NONZERO | NONFINITE | OVERFLOW exactly: 3e38 + 3e38 overflows float32 from finite inputs; an infinite input
    is NONFINITE without OVERFLOW; zeros give no flag."""
    out = memoryview(bytearray(4 * 4))
    big = _buf(np.array([3e38, 0, 0, 1], dtype=np.float32))
    flags = compute.merge_block([(out, "F32", 1.0)], big, "F32", 4, [_term(big, "F32", 1.0)])
    assert flags == compute.NONZERO | compute.NONFINITE | compute.OVERFLOW, flags
    inf = _buf(np.array([np.inf, 0, 0, 0], dtype=np.float32))
    zero = _buf(np.zeros(4, dtype=np.float32))
    flags = compute.merge_block([(out, "F32", 1.0)], inf, "F32", 4, [_term(zero, "F32", 1.0)])
    assert flags == compute.NONZERO | compute.NONFINITE, flags
    assert compute.merge_block([(out, "F32", 1.0)], zero, "F32", 4, [_term(zero, "F32", 1.0)]) == 0
    assert compute.diff_block(out, "F32", big, "F32", zero, "F32", 4) == compute.NONZERO


@pytest.mark.parametrize("rescale", [False, True])
def test_random_prune_without_rescale_keeps_values_unscaled(path: str, rescale: bool) -> None:
    """DARE on one block at an offset (p1 = density; p2 = density with rescale, 0 without): every output element is
    base, or base + v (without rescale) / base + v / d (with it); about d of them keep v."""
    n, d, offset = 4096, 0.25, 12345
    _, v, _ = _data(n)
    v = v.astype(np.float32) + np.float32(1.0)  # no zeros: a dropped element is told from a kept one
    base = np.zeros(n, dtype=np.float32)
    out = bytearray(n * 4)
    term = _term(_buf(v), "F32", 1.0, mode=compute.PRUNE_RANDOM, p1=d, p2=d if rescale else 0.0, key=99)
    compute.merge_block([(memoryview(out), "F32", 1.0)], _buf(base), "F32", n, [term], offset=offset)
    got = np.frombuffer(bytes(out), dtype=np.float32)
    kept = got != 0
    expected = (v / np.float32(d)) if rescale else v
    assert np.array_equal(got[kept], expected[kept]), _where(got[kept], expected[kept])
    assert 0.2 < kept.mean() < 0.3, kept.mean()


@pytest.mark.parametrize("sign", ["none", "total", "frequency"])
@pytest.mark.parametrize("normalize", [False, True])
def test_torch_path_matches_the_native_kernel(monkeypatch: pytest.MonkeyPatch, sign: str, normalize: bool) -> None:
    """One float32 block through the C kernel (capmerge/_native.c, an implementation of its own) and through torch
    (CAPMERGE_NO_NATIVE=1): equal bit for bit, flags included, over every pruning mode — magnitude with a threshold
    equal to a magnitude present (ties are kept), band, DARE with and without rescale — and sign election and
    normalisation."""
    if not compute.native_available():
        pytest.skip("native kernel not built")
    n = 1000
    rng = np.random.default_rng(3)
    base = rng.standard_normal(n).astype(np.float32)
    vs = [(rng.standard_normal(n) * 0.1).astype(np.float32) for _ in range(4)]
    thr = float(np.sort(np.abs(vs[0]))[n // 2])
    terms = [
        _term(_buf(vs[0]), "F32", 0.6, mode=compute.PRUNE_MAGNITUDE, p1=thr),
        _term(_buf(vs[1]), "F32", 0.4, mode=compute.PRUNE_BAND, p1=0.02, p2=0.15),
        _term(_buf(vs[2]), "F32", 0.5, mode=compute.PRUNE_RANDOM, p1=0.3, p2=0.3, key=5),
        _term(_buf(vs[3]), "F32", 0.7, mode=compute.PRUNE_RANDOM, p1=0.6, p2=0.0, key=6),
    ]
    got = {}
    for kind in ("native", "torch"):
        if kind == "torch":
            monkeypatch.setenv("CAPMERGE_NO_NATIVE", "1")
        out = bytearray(n * 4)
        flags = compute.merge_block([(memoryview(out), "F32", 0.9)], _buf(base), "F32", n, terms, sign=sign,
                                    normalize=normalize, offset=77)  # fmt: skip
        got[kind] = (np.frombuffer(bytes(out), dtype=np.float32), flags)
    assert np.array_equal(got["torch"][0], got["native"][0]), _where(got["torch"][0], got["native"][0])
    assert got["torch"][1] == got["native"][1]


@pytest.mark.parametrize("k", [64, 65])
def test_as_many_vectors_as_the_native_kernel_takes_and_one_more(k: int) -> None:
    """The C kernel takes at most 64 terms; a 65th sends the block to the torch path. Both equal numpy's float32
    sum in order, ((0 + w·v_1) + w·v_2) + …, then base + α·d."""
    n = 33
    rng = np.random.default_rng(k)
    base = rng.standard_normal(n).astype(np.float32)
    vs = [(rng.standard_normal(n) * 0.1).astype(np.float32) for _ in range(k)]
    w, alpha = np.float32(1 / k), np.float32(0.5)
    out = bytearray(n * 4)
    terms = [_term(_buf(v), "F32", float(w)) for v in vs]
    compute.merge_block([(memoryview(out), "F32", float(alpha))], _buf(base), "F32", n, terms)
    d = np.zeros(n, dtype=np.float32)
    for v in vs:
        d = d + w * v
    ref = base + alpha * d
    got = np.frombuffer(bytes(out), dtype=np.float32)
    assert np.array_equal(got, ref), _where(got, ref)
