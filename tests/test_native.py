"""The native block kernel against torch / numpy conversions, over every float16 value and edge cases."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from capmerge.merge import compute

pytestmark = pytest.mark.skipif(not compute.native_available(), reason="native kernel not built")


def _mv(t: torch.Tensor) -> memoryview:
    return memoryview(bytearray(t.contiguous().view(torch.uint8).numpy().tobytes()))


@pytest.fixture(params=[True, False], ids=["f16c", "portable"])
def f16_path(request: pytest.FixtureRequest):
    from capmerge import _native

    prev = _native.use_hardware_f16(request.param)
    yield request.param
    _native.use_hardware_f16(prev)


def _same(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (got == ref) | (torch.isnan(got.float()) & torch.isnan(ref.float()))


def test_every_float16_value_widens_exactly(f16_path: bool) -> None:
    h = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    z = torch.zeros(65536, dtype=torch.float16)
    out = bytearray(65536 * 4)
    compute.diff_block(memoryview(out), "F32", _mv(h), "F16", _mv(z), "F16", 65536)
    got = torch.frombuffer(out, dtype=torch.float32)
    assert bool(_same(got, h.float()).all())


@pytest.mark.parametrize("code,np_dtype", [("F16", np.float16)])
def test_float32_to_float16_rounds_like_numpy(f16_path: bool, code: str, np_dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1 << 18) * np.exp2(rng.integers(-30, 20, 1 << 18))).astype(np.float32)
    # ties, overflow threshold, subnormals, specials
    x[:10] = [65519.0, 65520.0, 65504.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, np.inf, -np.inf, np.nan, -0.0]
    out = bytearray(x.size * 2)
    zero = np.zeros_like(x)
    compute.diff_block(memoryview(out), code, memoryview(x.tobytes()), "F32", memoryview(zero.tobytes()), "F32", x.size)
    got = np.frombuffer(bytes(out), dtype=np_dtype)
    with np.errstate(over="ignore"):
        ref = x.astype(np_dtype)
    same = (got.view(np.uint16) == ref.view(np.uint16)) | (np.isnan(got) & np.isnan(ref))
    assert same.all(), (np.flatnonzero(~same)[:5], got[~same][:5], ref[~same][:5])


def test_float32_to_bfloat16_rounds_like_torch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 18, generator=g) * torch.exp2(torch.randint(-60, 60, (1 << 18,), generator=g).float())
    # exact ties between two bf16 values (round to even), the largest finite, specials
    x[:6] = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.3895314e38, float("inf"), float("nan"), -0.0])
    out = bytearray(x.numel() * 2)
    z = torch.zeros_like(x)
    compute.diff_block(memoryview(out), "BF16", _mv(x), "F32", _mv(z), "F32", x.numel())
    got = torch.frombuffer(out, dtype=torch.bfloat16)
    assert bool(_same(got, x.bfloat16()).all())


def _term(buf: memoryview, w: float = 1.0) -> tuple:
    return (buf, "F32", None, "F32", w, compute.PRUNE_NONE, 0.0, 0.0, 0)


def test_flags() -> None:
    z = torch.zeros(5)
    out = bytearray(20)
    assert compute.diff_block(memoryview(out), "F32", _mv(z), "F32", _mv(z), "F32", 5) == 0
    one = torch.tensor([0, 0, 0, 0, 1.0])
    assert compute.diff_block(memoryview(out), "F32", _mv(one), "F32", _mv(z), "F32", 5) == compute.NONZERO
    big = torch.tensor([3e38, 0, 0, 0, 0])
    f = compute.merge_block([(memoryview(out), "F32", 1.0)], _mv(big), "F32", 5, [_term(_mv(big))])
    assert f & compute.OVERFLOW and f & compute.NONFINITE
    inf = torch.tensor([float("inf"), 0, 0, 0, 0])
    f = compute.merge_block([(memoryview(out), "F32", 1.0)], _mv(inf), "F32", 5, [_term(_mv(z))])
    assert f & compute.NONFINITE and not f & compute.OVERFLOW


def test_small_buffers_are_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        compute.diff_block(memoryview(bytearray(4)), "F32", _mv(torch.zeros(4)), "F32", _mv(torch.zeros(4)), "F32", 4)


def test_bad_arguments_raise_from_merge_and_moments() -> None:
    """Every refused argument of merge() and moments() raises its own error (never a result with an error set)."""
    from capmerge import _native

    x = _mv(torch.ones(8))
    out = memoryview(bytearray(32))
    with pytest.raises(ValueError, match="unknown prune mode"):
        _native.moments([(x, 0, 9, 0.0, 0.0, 0)], None, 0, 8, 0, 1, memoryview(bytearray(64)))
    with pytest.raises(ValueError, match="too short"):
        _native.moments([(x, 0, 0, 0.0, 0.0, 0)], None, 0, 8, 0, 1, memoryview(bytearray(8)))
    with pytest.raises(ValueError, match="mask buffer"):
        _native.moments([(x, 0, 2, 0.5, 0.0, 0)], None, 0, 8, 0, 1, memoryview(bytearray(64)), [bytearray(0)])
    with pytest.raises(ValueError):
        _native.merge([(out, 0, 1.0)], x, 0, 8, [(x, 0, None, 0, 1.0, 9, 0.0, 0.0, 0)], 0, 0, 0)
    with pytest.raises(ValueError):
        _native.merge([(out, 0, 1.0)], x, 0, 8, [(x, 0, None, 0, 1.0, 4, 0.0, 0.0, 0)], 0, 0, 0)  # BITS, no bits


def _level0_bins(t: torch.Tensor) -> np.ndarray:
    """The threshold pass's level-0 bins by hand: the top 15 bits of |x| (the whole |x| pattern of a 16-bit value)."""
    if t.dtype == torch.float32:
        return (t.view(torch.int32).numpy().astype(np.int64) & 0x7FFFFFFF) >> 16
    return t.view(torch.int16).numpy().astype(np.int64) & 0x7FFF


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [0, 5, 31, 32, 33, 4097, 70_001])
def test_bracketed_counts_match_numpy(dtype: torch.dtype, n: int) -> None:
    """bracket() counts the bins inside [lo, hi] and how many lie above — vector loop and plain loop alike — and
    hist0() counts every bin; checked against numpy's bincount, with NaN, ±inf, zeros and both bracket ends."""
    from capmerge import _native

    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=g) * 0.01).to(dtype)
    if n > 100:
        t[::97], t[::89], t[::83] = float("nan"), -float("inf"), 0.0
    bins = _level0_bins(t)
    code = compute.NATIVE_CODES[{torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]]
    med = int(np.median(bins)) if n else 100
    for lo, hi in [(0, 32767), (0, 0), (32767, 32767), (med, med + 40), (med - 30, med), (med + 1, med + 1)]:
        for portable in (0, 1, 2):  # the fastest loop, plain C, AVX2 at most
            sub = np.zeros(4 * 32768, dtype=np.uint32)
            above = _native.bracket(_mv(t), code, n, lo, hi, sub, portable)
            assert above == int((bins > hi).sum())
            inside = bins[(bins >= lo) & (bins <= hi)]
            assert np.array_equal(sub.reshape(4, 32768).sum(0), np.bincount(inside, minlength=32768))
    sub = np.zeros(4 * 32768, dtype=np.uint32)
    _native.hist0(_mv(t), code, n, sub)
    _native.hist0(_mv(t), code, n, sub)  # counts add up across calls
    assert np.array_equal(sub.reshape(4, 32768).sum(0), 2 * np.bincount(bins, minlength=32768))
    with pytest.raises(ValueError, match="bracket"):
        _native.bracket(_mv(t), code, n, 10, 9, sub, False)
    with pytest.raises(ValueError, match="4 x 32768"):
        _native.hist0(_mv(t), code, n, np.zeros(100, dtype=np.uint32))


@pytest.mark.parametrize("n", [0, 5, 17, 4097, 70_001])
def test_level1_counts_of_several_bins_match_numpy(n: int) -> None:
    """hist1() counts the low 16 bits of the float32 |x| whose level-0 bin is one of up to 16 bins, a row per bin, in
    one pass — vector loop and plain loop alike, with a bin holding most entries (the vector loop's buffer fills and
    empties many times), NaN, ±inf, −0 and bins no entry holds; checked against numpy."""
    from capmerge import _native

    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g) * 0.01
    if n > 100:
        t[::3] = torch.rand(len(t[::3]), generator=g) * 2**-28 + 2**-20  # a third of the entries in one level-0 bin
        t[::97], t[::89], t[::83] = float("nan"), -float("inf"), -0.0
    bits = t.view(torch.int32).numpy().astype(np.int64) & 0x7FFFFFFF
    held, count = np.unique(bits >> 16, return_counts=True)
    common = [int(b) for b in held[np.argsort(-count, kind="stable")][:14]]  # the most entries first
    for wanted in ([12345], [0x7F80, 0x7FC0] + common, sorted({0, 0x7F80} | set(common[:1]))):
        w = np.array(list(dict.fromkeys(wanted))[:16], dtype=np.uint32)  # distinct bins, as the kernel takes
        for portable in (0, 1, 2):  # the fastest loop, plain C, AVX2 at most
            hist = np.zeros((len(w), 65536), dtype=np.uint64)
            _native.hist1(_mv(t), n, w, hist, portable)
            _native.hist1(_mv(t), n, w, hist, portable)  # counts add up across calls
            for row, b in enumerate(w):
                inside = bits[(bits >> 16) == b] & 0xFFFF
                assert np.array_equal(hist[row], 2 * np.bincount(inside, minlength=65536)), (row, portable)
    with pytest.raises(ValueError, match="1 to 16"):
        _native.hist1(_mv(t), n, np.arange(17, dtype=np.uint32), np.zeros((17, 65536), dtype=np.uint64))
    with pytest.raises(ValueError, match="1 to 16"):
        _native.hist1(_mv(t), n, np.arange(2, dtype=np.uint32), np.zeros((1, 65536), dtype=np.uint64))


_CODE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@pytest.mark.parametrize(("da", "db"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                        (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)])  # fmt: skip
@pytest.mark.parametrize("n", [0, 7, 16, 33, 4097, 70_001])
def test_bracket_diff_counts_and_collects_like_numpy(da: torch.dtype, db: torch.dtype, n: int) -> None:
    """bracket_diff() = bracket() of the float32 a − b, and it collects exactly the |a − b| patterns inside the
    bracket whose low 16 bits are not zero (vector and plain loop; numpy by hand), with NaN, ±inf and zeros."""
    from capmerge import _native

    g = torch.Generator().manual_seed(n + 1)
    b = (torch.randn(n, generator=g) * 0.02).to(db)
    a = (b.float() + torch.randn(n, generator=g) * 0.002 * (torch.rand(n, generator=g) < 0.9)).to(da)
    if n > 100:
        a[::97], b[::89], a[::83] = float("nan"), -float("inf"), 0.0
    tau = a.float() - b.float()
    bits = tau.view(torch.int32).numpy().astype(np.int64) & 0x7FFFFFFF
    bins = bits >> 16
    med = int(np.median(bins)) if n else 100
    ca, cb = compute.NATIVE_CODES[_CODE[da]], compute.NATIVE_CODES[_CODE[db]]
    f32 = compute.NATIVE_CODES["F32"]
    for lo, hi in [(0, 32767), (med, med + 40), (max(0, med - 30), med), (32767, 32767)]:
        inside = (bins >= lo) & (bins <= hi)
        want = np.sort(bits[inside & ((bits & 0xFFFF) != 0)])
        for portable in (0, 1, 2):  # the fastest loop, plain C, AVX2 at most
            sub, col = np.zeros(4 * 32768, dtype=np.uint32), np.zeros(n + 64, dtype=np.uint32)
            above, ncol = _native.bracket_diff(_mv(a), ca, _mv(b), cb, n, lo, hi, sub, portable, col, 0)
            assert above == int((bins > hi).sum())
            assert np.array_equal(sub.reshape(4, 32768).sum(0), np.bincount(bins[inside], minlength=32768))
            assert np.array_equal(np.sort(col[:ncol].astype(np.int64)), want)
            # bracket() on the float32 difference collects the same
            sub2, col2 = np.zeros(4 * 32768, dtype=np.uint32), np.zeros(n + 64, dtype=np.uint32)
            up2, n2 = _native.bracket(_mv(tau), f32, n, lo, hi, sub2, portable, col2, 0)
            assert (up2, n2) == (above, ncol)
            assert np.array_equal(np.sort(col2[:n2].astype(np.int64)), want)
            # a buffer too small says so (-1) and still counts; -1 in means nothing is collected
            if len(want) > 40:
                sub3 = np.zeros(4 * 32768, dtype=np.uint32)
                small = np.zeros(len(want) // 2, dtype=np.uint32)
                assert _native.bracket_diff(_mv(a), ca, _mv(b), cb, n, lo, hi, sub3, portable, small, 0) == (above, -1)
                assert np.array_equal(sub3.reshape(4, 32768).sum(0), sub.reshape(4, 32768).sum(0))
            assert _native.bracket_diff(_mv(a), ca, _mv(b), cb, n, lo, hi, sub, portable, col, -1)[1] == -1
    sub = np.zeros(4 * 32768, dtype=np.uint32)
    with pytest.raises(ValueError, match="ncol"):
        _native.bracket_diff(_mv(a), ca, _mv(b), cb, n, 0, 10, sub, False, np.zeros(4, dtype=np.uint32), 5)
    with pytest.raises(ValueError, match="float32 only"):
        _native.bracket(_mv(b), cb, n, 0, 10, sub, False, np.zeros(4, dtype=np.uint32), 0)


@pytest.mark.parametrize("codes", [("BF16", "BF16", "BF16"), ("F16", "F32", "BF16"), ("BF16", "BF16", "F32")])
@pytest.mark.parametrize("modes", [(1, 1, 1), (0, 0, 0), (1, 3, 4), (4, 0, 3)])
@pytest.mark.parametrize("sign", ["none", "total", "frequency", "sum"])
def test_fast_merge_path_equals_the_tile_loops(codes: tuple[str, str, str], modes: tuple[int, ...], sign: str) -> None:
    """merge()'s vector path (relative terms a − b, magnitude, band and keep-bit pruning) writes the bytes and flags
    of its plain tile loops, for any length (vector body + tail), block offset (keep bits at an offset that is not
    a multiple of 8 go to the tile loops) and normalize; inputs with NaN, ±inf and zeros. codes: models, base, out."""
    from capmerge import _native

    mc, bc, oc = codes
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    g = torch.Generator().manual_seed(sum(modes) + len(sign))
    n_all = 4099 + 13
    base = (torch.randn(n_all, generator=g) * 0.02).to(tdt[bc])
    models = [(base.float() + torch.randn(n_all, generator=g) * 0.003).to(tdt[mc]) for _ in modes]
    models[0][::101], models[1][::103], base[::107] = float("nan"), float("inf"), 0.0
    bits = np.packbits(torch.rand(n_all, generator=g).numpy() < 0.4, bitorder="little")
    thr = [float(torch.quantile((m.float() - base.float()).abs().nan_to_num(posinf=1.0), q)) for m, q in
           zip(models, (0.3, 0.5, 0.7), strict=True)]  # fmt: skip
    for n in (16, 37, 1029, 4099):
        for off in (0, 8, 3):
            raw_base = _mv(base[off : off + n])
            terms = [(_mv(m[off : off + n]), mc, raw_base, bc, w, mode, t, 2.5 * t, 0, bits)
                     for m, w, mode, t in zip(models, (0.5, 0.3, -0.2), modes, thr, strict=True)]  # fmt: skip
            for normalize in (False, True, compute.NORMALIZE_FLOOR):
                got = []
                for fast in (1, 2, 0):  # every fused path, AVX2 ones only, the tile loops
                    prev = _native.use_fast_merge(fast)
                    try:
                        out = bytearray(n * (4 if oc == "F32" else 2))
                        flags = compute.merge_block([(memoryview(out), oc, 0.8)], raw_base, bc, n, terms, sign=sign,
                                                    normalize=normalize, offset=off)  # fmt: skip
                    finally:
                        _native.use_fast_merge(prev)
                    got.append((bytes(out), flags))
                assert got[0] == got[1] == got[2], (n, off, normalize)


@pytest.mark.parametrize("k", [0, 1, 2, 4])
@pytest.mark.parametrize("n_out", [1, 2])
def test_fast_merge_path_in_bf16_equals_the_tile_loops(k: int, n_out: int) -> None:
    """merge()'s vector path in bf16 (its sixteen-lane form where the CPU has AVX-512) for every number of terms it
    unrolls, none included (a pure cast: -0.0 stays), and several outputs: the bytes and flags of the tile loops,
    with NaN, ±inf and zeros among the inputs, each pruning mode and sign election, any normalize."""
    from capmerge import _native

    g = torch.Generator().manual_seed(31 * k + n_out)
    n = 2 * 1024 + 64 + 21
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    base[::97], base[5] = float("nan"), -0.0
    base.view(torch.int16)[7] = 0x7F81  # a signalling NaN: quietened on the way out
    models = [(base.float() + torch.randn(n, generator=g) * 0.003).bfloat16() for _ in range(k)]
    if k:
        models[0][::89], models[-1][::83] = float("-inf"), 0.0
    bits = np.packbits(torch.rand(n, generator=g).numpy() < 0.4, bitorder="little")
    modes = [compute.PRUNE_NONE, compute.PRUNE_MAGNITUDE, compute.PRUNE_BAND, compute.PRUNE_BITS]
    for sign in ("none", "total", "frequency", "sum"):
        for normalize in (False, True, compute.NORMALIZE_FLOOR):
            raw_base = _mv(base)
            terms = [(_mv(m), "BF16", raw_base, "BF16", 0.7 - 0.3 * i, modes[(i + len(sign)) % 4], 0.001, 0.004, 0,
                      bits) for i, m in enumerate(models)]  # fmt: skip
            got = []
            for fast in (1, 2, 0):  # every fused path, AVX2 ones only, the tile loops
                prev = _native.use_fast_merge(fast)
                try:
                    outs = [bytearray(2 * n) for _ in range(n_out)]
                    flags = compute.merge_block([(memoryview(o), "BF16", 0.8 + 0.1 * i) for i, o in enumerate(outs)],
                                                raw_base, "BF16", n, terms, sign=sign, normalize=normalize)  # fmt: skip
                finally:
                    _native.use_fast_merge(prev)
                got.append(([bytes(o) for o in outs], flags))
            assert got[0] == got[1] == got[2], (sign, normalize)


def _della_inputs(
    kind: str, ac: str, bc: str | None, n: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs for the DELLA rank test: kinds of |v| rows (specials, repeated values, one narrow range, subnormals, a
    wide range of magnitudes)."""
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    if kind == "specials":  # NaN and ±inf, many equal |v|
        a = (torch.randint(-4, 5, (n,), generator=g).float() * 0.25 + torch.randn(n, generator=g)).to(tdt[ac])
        a[::13], a[::29], a[5::31] = float("nan"), float("inf"), float("-inf")
    elif kind == "model_diffs":  # θ − θ₀ of 16-bit models: mostly 16-bit-exact (radix digits skipped), zeros
        base = torch.randn(n, generator=g) * 0.02
        a = (base + torch.randn(n, generator=g) * 0.002 * torch.randint(0, 2, (n,), generator=g)).to(tdt[ac])
        return a, base.to(tdt[bc]) if bc else base
    elif kind == "narrow":  # one range of the top bits, every low half different
        a = (1.0 + torch.rand(n, generator=g) * 2**-9).to(tdt[ac])
        a[::3] = 1.0
    elif kind == "tiny":  # subnormals and zeros
        a = (torch.randn(n, generator=g) * 1e-41 * torch.randint(0, 2, (n,), generator=g)).to(tdt[ac])
    else:  # "wide": magnitudes from 2^-100 to 2^60
        a = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-100, 60, (n,), generator=g).float())).to(tdt[ac])
    b = (torch.randn(n, generator=g) * 0.1).to(tdt[bc]) if bc and kind == "specials" else None
    return a, b


_DELLA_CASES = [(c, k) for c in (("BF16", "BF16"), ("F16", "F32"), ("F32", None)) for k in ("specials", "model_diffs")]
_DELLA_CASES += [(("BF16", "F16"), "model_diffs")]  # a base the fused AVX-512 loop reads made float32 first
_DELLA_CASES += [(("F32", None), k) for k in ("narrow", "tiny", "wide")]  # float32 patterns


def _della_reference(v: torch.Tensor, rows: int, m: int, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """DELLA's keep test as documented, entry by entry in Python: kept where x < lo; where lo <= x < hi, kept where
    the entry's rank in its row (torch's stable argsort of |v|: ties in index order, NaN last) exceeds that of
    entry o = t + [t >= j], t = ((x - lo)·⌊(m − 1)·2^32 / (hi − lo)⌋) >> 32; a row of one entry: x − lo <
    ⌊(hi − lo)/2⌋."""
    order = torch.argsort(v.abs().reshape(rows, m), dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(m).expand(order.shape)).numpy()
    r = ((m - 1) << 32) // (hi - lo) if hi > lo else 0
    keep = np.zeros(rows * m, dtype=bool)
    for row in range(rows):
        for j in range(m):
            xj = int(x[row * m + j])
            if xj < lo:
                keep[row * m + j] = True
            elif xj < hi:
                if m == 1:
                    keep[row * m + j] = xj - lo < (hi - lo) // 2
                else:
                    t = ((xj - lo) * r) >> 32
                    o = t + (t >= j)
                    keep[row * m + j] = ranks[row, j] > ranks[row, o]
    return keep


@pytest.mark.parametrize(("codes", "kind"), _DELLA_CASES)
@pytest.mark.parametrize("m", [1, 7, 256, 2053])
@pytest.mark.parametrize("path", [0, 1, 2])  # the fastest loops (fused where 8 divides m), AVX2 at most, plain C
def test_della_keep_bits_follow_the_row_ranks(codes: tuple[str, str | None], kind: str, m: int, path: int) -> None:
    """della(): the keep bits of the documented test (:func:`_della_reference`: ranks from torch's stable argsort,
    the draws from the torch Philox reference), the sums Σ|v|, Σ|kept| against numpy's float64 sums, for several
    kinds of rows (NaN and ±inf, ties and zeros, subnormals, 160 octaves) and bands: ε 0.3 (60 % of the draws in
    the band), 0.05, 0 (no band), 1e-7 (a band narrower than a row: its products need 64 bits, the plain loop) and
    0.6 (the band is every draw: x_lo = 0, x_hi = 2^31)."""
    from capmerge import _native
    from capmerge import functional as F

    ac, bc = codes
    g = torch.Generator().manual_seed(m)
    rows = 9 if m < 1000 else 3  # the reference is a Python loop
    n = rows * m
    a, b = _della_inputs(kind, ac, bc, n, g)
    v = a.float() - b.float() if b is not None else a.float()
    av = np.abs(v.numpy().astype(np.float64))
    for offset, eps in ((0, 0.3), (8, 0.3), (4096, 0.05), (16, 0.0), (24, 1e-7), (32, 0.6)):  # 1e-7: ~430 draws
        lo, hi = F.della_bounds(0.4, eps)
        keep = _della_reference(v, rows, m, F.philox_ints(77, offset, n).numpy(), lo, hi)
        bits = np.zeros((offset + n + 7) // 8 + 3, dtype=np.uint8)
        bits[offset // 8 - 1 if offset else -1] = 0xA5  # bytes outside the block stay as they are
        bview = _mv(b) if b is not None else None
        term = (_mv(a), compute.NATIVE_CODES[ac], 77, lo, hi, bits)
        [(l1, kept)] = _native.della([term], bview, compute.NATIVE_CODES.get(bc, 0), rows, m, offset, path)
        got = np.unpackbits(bits, bitorder="little")[offset : offset + n].astype(bool)
        assert np.array_equal(got, keep), (offset, eps)
        assert bits[offset // 8 - 1 if offset else -1] == 0xA5
        with np.errstate(invalid="ignore"):
            assert l1 == pytest.approx(av.sum(), rel=1e-12, nan_ok=True)
            assert kept == pytest.approx(np.where(keep, av, 0.0).sum(), rel=1e-12, nan_ok=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        _native.della([(_mv(a), compute.NATIVE_CODES[ac], 77, lo, hi, bits)], None, 0, rows, m, 3)
    with pytest.raises(ValueError, match="xl <= xh"):
        _native.della([(_mv(a), compute.NATIVE_CODES[ac], 77, hi + 1, hi, bits)], None, 0, rows, m, 0)
    with pytest.raises(ValueError, match="shorter"):
        _native.della([(_mv(a), compute.NATIVE_CODES[ac], 77, lo, hi, bits[:1])], None, 0, rows, m, 0)


def _della_call(models: list[torch.Tensor], codes: list[str], base: torch.Tensor, base_code: str,
                bands: list[tuple[int, int]], rows: int, m: int, order: list[int],
                path: int) -> dict[int, tuple[tuple[float, float], bytes]]:  # fmt: skip
    """One della() call over the models in ``order`` (model i: key 5 + i, band i), block at element 64: each model's
    sums and keep bits."""
    from capmerge import _native

    bits = {i: np.zeros((rows * m + 7) // 8 + 8, dtype=np.uint8) for i in order}
    terms = [(_mv(models[i]), compute.NATIVE_CODES[codes[i]], 5 + i, *bands[i], bits[i]) for i in order]
    sums = _native.della(terms, _mv(base), compute.NATIVE_CODES[base_code], rows, m, 64, path)
    return {i: (tuple(s), bytes(bits[i])) for i, s in zip(order, sums, strict=True)}


def test_della_paths_give_the_same_bits_and_sums() -> None:
    """The fused passes (rows of a multiple of 8: AVX-512 for bf16/float32, AVX2 for those and f16), the AVX2 rows and
    the plain loops: the same keep bits and the same float64 sums, bit for bit, over blocks that start mid-tensor;
    several models in one call (the base read once) give each model's own call's bits and sums, in any order."""
    from capmerge import functional as F

    g = torch.Generator().manual_seed(4)
    dts = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    bands = [F.della_bounds(0.3, 0.15), F.della_bounds(0.5, 0.01), F.della_bounds(0.2, 0.0)]
    cases = [(8, "BF16", "BF16"), (24, "BF16", "BF16"), (2048, "BF16", "BF16"), (40, "F32", "BF16"),
             (40, "F16", "BF16"), (13, "BF16", "BF16"), (48, "BF16", "F16"), (48, "F16 BF16 F32", "F16")]  # fmt: skip
    for m, code, base_code in cases:  # an f16 base: the AVX-512 loop reads it made float32, AVX2's as it is
        rows = 70
        codes = (code.split() * 3)[:3]
        models = [torch.randn(rows * m, generator=g).to(dts[c]) for c in codes]
        base = torch.randn(rows * m, generator=g).to(dts[base_code])
        alone = {i: _della_call(models, codes, base, base_code, bands, rows, m, [i], 2)[i] for i in range(3)}
        assert _della_call(models, codes, base, base_code, bands, rows, m, [0, 1, 2], 0) == alone, m
        assert _della_call(models, codes, base, base_code, bands, rows, m, [1, 2, 0], 1) == alone, m
        assert _della_call(models, codes, base, base_code, bands, rows, m, [2, 0, 1], 2) == alone, m


def test_select_gives_the_values_numpy_sorts_to_those_ranks() -> None:
    """select(): the float32 values of 0-based ranks, as numpy's sort puts them, for values ≥ 0 of every kind (ties,
    all equal, −0 among them, +inf, subnormals, 40 octaves) and sizes (one value to 3·10⁵: bins of many and of one),
    ranks in any order and repeated; values in a narrow range (bins of single values: the bins follow the values'
    range) and in one octave; a value below 0 (not −0): None; a rank outside the values or more than 255 ranks:
    ValueError."""
    from capmerge import _native

    rng = np.random.default_rng(12)
    kinds = {
        "spread": lambda n: np.exp2(rng.uniform(-20, 20, n)),
        "ties": lambda n: rng.integers(0, 4, n).astype(np.float64),
        "equal": lambda n: np.full(n, 0.75),
        "zeros": lambda n: np.where(rng.random(n) < 0.5, -0.0, rng.random(n)),
        "specials": lambda n: rng.choice([0.0, np.inf, 1e-45, 3e-39, 1.0, 2.5], n),
        "narrow": lambda n: 1.0 + rng.integers(0, 3000, n) * 2.0**-23,
        "octave": lambda n: rng.uniform(1.0, 2.0, n),
    }
    for name, make in kinds.items():
        for n in (1, 2, 17, 4099, 300_001):
            x = make(n).astype(np.float32)
            ranks = [int(r) for r in rng.integers(0, n, 5)] + [n - 1, 0, n // 2, n - 1]
            want = np.sort(np.abs(x))[ranks]  # −0 sorts as +0
            got = np.array(_native.select(x, ranks), dtype=np.float32)
            assert np.array_equal(got, want), (name, n)
            assert not np.signbit(got).any()
    for at in (0, 4098, 9999):
        x = np.abs(rng.standard_normal(10_000)).astype(np.float32)
        x[at] = -1e-30
        assert _native.select(x, [0, 5000]) is None
    x = np.ones(10, dtype=np.float32)
    with pytest.raises(ValueError, match="outside"):
        _native.select(x, [10])
    with pytest.raises(ValueError, match="outside"):
        _native.select(x, [-1])
    with pytest.raises(ValueError, match="255"):
        _native.select(x, [0] * 256)
    assert _native.select(x, []) == []


def test_philox_ints_are_the_uniforms_integers() -> None:
    """philox_ints(): the torch reference's integers (tl.rand's before the scaling) from any start, in every loop
    (AVX-512, AVX2, plain C: one Philox loop per instruction set writes floats or integers); scaled by 2^-31 in
    float32 they are philox()'s floats."""
    from capmerge import _native
    from capmerge import functional as F

    for start in (0, 3, 8, 1001):
        want = F.philox_ints(123, start, 517)
        floats = np.empty(517, dtype=np.float32)
        _native.philox(123, start, 517, floats)
        assert torch.equal(want.float() * torch.tensor(4.6566127342e-10), torch.from_numpy(floats))
        for path in (0, 1, 2):
            out = np.empty(517, dtype=np.int32)
            _native.philox_ints(123, start, 517, out, path)
            assert torch.equal(torch.from_numpy(out).long(), want), (start, path)


def test_kept_bits_scale_like_the_torch_path() -> None:
    """merge()'s PRUNE_BITS multiplies the kept entries by p1 (≠ 0) before weighting — what the torch path and
    capmerge.functional.rescale_l1 compute (pruned·ratio, then w·that), bit for bit."""

    g = torch.Generator().manual_seed(5)
    n = 1000
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(n, generator=g) * 0.003).bfloat16() for _ in range(3)]
    bits = [np.packbits(torch.rand(n, generator=g).numpy() < 0.5, bitorder="little") for _ in models]
    raw = _mv(base)
    for sign, normalize in (("none", False), ("total", True)):
        terms = [(_mv(m), "BF16", raw, "BF16", w, compute.PRUNE_BITS, s, 0.0, 0, bt)
                 for m, w, s, bt in zip(models, (0.5, 0.3, 0.4), (1.9, 0.0, 2.3), bits, strict=True)]  # fmt: skip
        outs = []
        for native in (True, False):
            out = bytearray(4 * n)
            if native:
                compute.merge_block([(memoryview(out), "F32", 1.0)], raw, "BF16", n, terms, sign=sign,
                                    normalize=normalize)  # fmt: skip
            else:
                compute._torch_merge([(memoryview(out), "F32", 1.0)], raw, "BF16", n, terms, sign, normalize, 0)
            outs.append(np.frombuffer(bytes(out), dtype=np.float32))
        assert np.array_equal(outs[0], outs[1])
        # by hand: the scaled kept entries of model 0, where no other model is kept
        keep = [np.unpackbits(b, bitorder="little")[:n].astype(bool) for b in bits]
        only0 = keep[0] & ~keep[1] & ~keep[2]
        tau0 = models[0].float().numpy() - base.float().numpy()
        want = base.float().numpy() + np.float32(0.5) * (tau0 * np.float32(1.9))
        if normalize:
            want = base.float().numpy() + (np.float32(0.5) * (tau0 * np.float32(1.9))) / np.float32(0.5)
            only0 &= tau0 != 0
        assert np.array_equal(outs[0][only0], want[only0].astype(np.float32))


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (4e-7, 3e-7, 0.0)])
def test_sce_election_and_divisor_floor_match_torch(weights: tuple[float, ...]) -> None:
    """Sign "sum" elects on Σ τ̃_i whatever the weights, and NORMALIZE_FLOOR divides by max(Σ w_i·m_i, 1e-6):
    mergekit's SCE step, computed by hand with torch, against both kernel paths (weights below the floor too)."""
    g = torch.Generator().manual_seed(11)
    n = 1000
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(n, generator=g) * (0.003 * (i + 1))).bfloat16() for i in range(3)]
    raw = _mv(base)
    terms = [(_mv(m), "BF16", raw, "BF16", w, compute.PRUNE_NONE, 0.0, 0.0, 0)
             for m, w in zip(models, weights, strict=True)]  # fmt: skip
    taus = [m.float() - base.float() for m in models]
    s = torch.where(sum(taus[1:], taus[0]) >= 0, 1.0, -1.0)  # ((τ0 + τ1) + τ2), + on a tie
    d = torch.zeros(n)
    den = torch.zeros(n)
    for t, w in zip(taus, weights, strict=True):
        agree = torch.where(s > 0, t > 0, t < 0)
        d = d + torch.where(agree, torch.tensor(w) * t, torch.zeros(n))
        den = den + torch.where(agree, torch.tensor(w), torch.zeros(n))
    want = (base.float() + d / den.clamp(min=1e-6)).numpy()
    for path in ("fast", "tiles", "torch"):
        out = bytearray(4 * n)
        if path == "torch":
            compute._torch_merge([(memoryview(out), "F32", 1.0)], raw, "BF16", n, terms, "sum",
                                 compute.NORMALIZE_FLOOR, 0)  # fmt: skip
        else:
            from capmerge import _native

            prev = _native.use_fast_merge(path == "fast")
            try:
                compute.merge_block([(memoryview(out), "F32", 1.0)], raw, "BF16", n, terms, sign="sum",
                                    normalize=compute.NORMALIZE_FLOOR)  # fmt: skip
            finally:
                _native.use_fast_merge(prev)
        assert np.array_equal(np.frombuffer(bytes(out), dtype=np.float32), want), path


_SCE_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


@pytest.mark.parametrize("fused", [1, 2, 0])  # fused (AVX-512 or AVX2), AVX2, tiles
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 49])
@pytest.mark.parametrize("n", [1, 13, 1024, 3001])
def test_sce_variance_mask_and_energies_against_torch(k: int, n: int, fused: int) -> None:
    """sce(): the per-element population variance of v_i = a_i − base is torch.var(unbiased=False)'s bits; the count
    of var ≠ 0 (NaN counts); keep bits of var ≥ thr at a block offset; Σ v_i² (all, or over the kept entries: a
    dropped inf or NaN adds 0, as the merge drops it) against numpy float64. Every path: the fused AVX-512 and AVX2
    tiles (where the CPU has them; divisions by 3, 5, 7 … without a division, by 49 with one) and the tile loops;
    bf16, float32 and float16 models, differences of every scale."""
    from capmerge import _native

    g = torch.Generator().manual_seed(k * 7919 + n)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    scale = torch.exp2(torch.randint(-20, 4, (n,), generator=g).float()) * torch.randint(0, 2, (n,), generator=g)
    models = [(base.float() + torch.randn(n, generator=g) * 0.001 * scale)
              .to(list(_SCE_DTYPES)[i % 3]) for i in range(k)]  # fmt: skip
    if n > 100:
        models[0][7], models[-1][50] = float("nan"), float("inf")
    taus = [m.float() - base.float() for m in models]
    want = torch.var(torch.stack(taus), dim=0, unbiased=False)
    ins = [(_mv(m), compute.NATIVE_CODES[_SCE_DTYPES[m.dtype]]) for m in models]
    prev = _native.use_fast_merge(fused)
    try:
        _check_sce(ins, base, taus, want, k, n)
    finally:
        _native.use_fast_merge(prev)


def _check_sce(ins: list, base: torch.Tensor, taus: list, want: torch.Tensor, k: int, n: int) -> None:
    from capmerge import _native

    var = torch.empty(n)
    nnz = _native.sce(ins, _mv(base), 2, n, 0, memoryview(var.numpy()).cast("B"), 0.0, None, None)
    assert torch.equal(var.view(torch.int32), want.view(torch.int32)) or torch.equal(
        torch.nan_to_num(var, nan=-1.0), torch.nan_to_num(want, nan=-1.0)
    )
    assert nnz == int(torch.count_nonzero(want))
    thr = float(want.nan_to_num(nan=0.0).median())
    x = [t.double().numpy() for t in taus]
    for offset in (0, 16):
        bits = np.full((offset + n + 7) // 8 + 2, 0xFF, dtype=np.uint8)
        sums = np.zeros(k)
        _native.sce(ins, _mv(base), 2, n, offset, None, thr, bits, sums)
        keep = (want >= thr).numpy()
        assert np.array_equal(np.unpackbits(bits, bitorder="little")[offset : offset + n].astype(bool), keep)
        assert bits[-1] == 0xFF and (offset == 0 or bits[0] == 0xFF)  # bytes outside the block untouched
        with np.errstate(invalid="ignore"):
            for i in range(k):
                assert sums[i] == pytest.approx(np.where(keep, x[i] * x[i], 0.0).sum(), rel=1e-12, nan_ok=True)
        all_sums, only_sums = np.zeros(k), np.zeros(k)
        _native.sce(ins, _mv(base), 2, n, 0, None, 0.0, None, all_sums)
        for i in range(k):
            assert all_sums[i] == pytest.approx((x[i] * x[i]).sum(), rel=1e-12, nan_ok=True)
        # without the count (no selection): no variance, the same sums bit for bit
        assert _native.sce(ins, _mv(base), 2, n, 0, None, 0.0, None, only_sums, False) == 0
        assert np.array_equal(only_sums, all_sums, equal_nan=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        _native.sce(ins, _mv(base), 2, n, 3, None, thr, bits, np.zeros(k))


@pytest.mark.parametrize("lanes", [4, 8])
def test_sce_division_without_a_divider_is_the_division(lanes: int) -> None:
    """run_sce's d / c as q = d·RN(1/c), then q + (d − c·q)·RN(1/c) with FMAs: numpy's correctly rounded quotient,
    bit for bit, for every count c up to 64 where RN(1/c) is within 2^-54 of 1/c (all but 49, which divides), on
    random doubles of every scale, differences of float32 values and quotients a hair off a rounding tie (c times
    the midpoint of two doubles, give or take a few ulps); the four-lane form also on ±0, ±inf, NaN and subnormals
    (which it divides), the eight-lane one (for finite dividends above 2^-960 or +0) on +0."""
    from capmerge import _native

    rng = np.random.default_rng(lanes)
    n = 1 << 14
    wide = rng.standard_normal(n) * np.exp2(rng.integers(-200, 200, n).astype(np.float64))
    f32 = (rng.standard_normal(n).astype(np.float32) * np.float32(1e-3)).astype(np.float64) - rng.standard_normal(
        n
    ).astype(np.float32).astype(np.float64) * 1e-3
    lo = rng.uniform(1, 2, n) * np.exp2(rng.integers(-100, 100, n).astype(np.float64))
    ran = []
    for c in range(1, 65):
        near = (np.float64(c) * lo + np.float64(c) * (np.nextafter(lo, np.inf) - lo) / 2).view(np.int64)
        near = (near + rng.integers(-3, 4, n)).view(np.float64)  # c · (lo + ulp / 2), a few ulps either way
        d = np.concatenate([wide, f32, near, -near])
        special = [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, 1e-310, 1e308] if lanes == 4 else [0.0] * 8
        d = np.concatenate([d, special])
        got = d.copy()
        ran.append(_native.divide_by(got, float(c), lanes))
        if ran[-1]:
            want = d / np.float64(c)
            assert np.array_equal(got.view(np.int64)[~np.isnan(want)], want.view(np.int64)[~np.isnan(want)]), c
            assert np.array_equal(np.isnan(got), np.isnan(want)), c
    if ran[3]:  # the path exists on this CPU: every c but 49
        assert ran == [c != 49 for c in range(1, 65)]


@pytest.mark.parametrize("fused", [1, 2, 0])  # fused (AVX-512 or AVX2), AVX2, tiles
def test_sce_lists_the_bracket_and_finishes_it(fused: int) -> None:
    """sce() with a list: the keep bits and sums of var ≥ thr as without, and the entries with lo ≤ var < thr (lo one
    of the variances itself: ≥, not >) listed in order with their index, var and v_i; a list past its room reads −1;
    the count of var ≥ thr and NaN (the level-0 bins above a bracket ending at thr).
    sce_finish() then sets the bits of the listed entries at or above a threshold t inside and adds their v_i² in
    float64: together, the bits and sums of var ≥ t (numpy)."""
    from capmerge import _native

    g = torch.Generator().manual_seed(17)
    n, k = 5000, 3
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(n, generator=g) * 1e-3).bfloat16() for _ in range(k)]
    models[2][9] = float("nan")
    taus = [m.float() - base.float() for m in models]
    var = torch.var(torch.stack(taus), dim=0, unbiased=False).numpy()
    ordered = np.sort(var[~np.isnan(var)])
    lo, t, hi = float(ordered[3000]), float(ordered[3100]), float(ordered[3300])
    ins = [(_mv(m), 2) for m in models]
    prev = _native.use_fast_merge(fused)
    try:
        room = 400 + 16
        idx, lv, tau = np.zeros(room, np.uint32), np.zeros(room, np.float32), np.zeros(k * room, np.float32)
        bits, sums = np.zeros(n // 8 + 1, np.uint8), np.zeros(k)
        nnz, listed, above = _native.sce(ins, _mv(base), 2, n, 0, None, hi, bits, sums, True, lo, idx, lv, tau)
        small = [np.zeros(16 + 16, np.uint32), np.zeros(32, np.float32), np.zeros(k * 32, np.float32)]
        assert (
            _native.sce(ins, _mv(base), 2, n, 0, None, hi, np.zeros_like(bits), np.zeros(k), True, lo, *small)[1] == -1
        )
    finally:
        _native.use_fast_merge(prev)
    inside = np.flatnonzero((var >= lo) & (var < hi))
    assert nnz == int(np.count_nonzero(var)) and listed == len(inside)
    assert above == int(np.count_nonzero((var >= hi) | np.isnan(var)))  # NaN above every bracket
    assert np.array_equal(idx[:listed], inside) and np.array_equal(lv[:listed], var[inside])
    for i in range(k):
        assert np.array_equal(tau.reshape(k, room)[i, :listed], taus[i].numpy()[inside])
    assert np.array_equal(np.unpackbits(bits, bitorder="little")[:n].astype(bool), var >= hi)
    taus_kept = np.ascontiguousarray(tau.reshape(k, room)[:, :listed])
    _native.sce_finish(idx[:listed].copy(), lv[:listed].copy(), taus_kept, listed, t, bits, sums)
    keep = var >= t
    assert np.array_equal(np.unpackbits(bits, bitorder="little")[:n].astype(bool), keep)
    for i in range(k):
        x = taus[i].double().numpy()
        assert sums[i] == pytest.approx(np.where(keep, x * x, 0.0).sum(), rel=1e-12)


def test_sce_fused_path_gives_the_tile_loops_bits() -> None:
    """sce()'s fused tiles (AVX-512, AVX2) and its tile loops: the same variance, count, keep bits and float64 sums,
    bit for bit (the sums in the same order), on rows long enough for several tiles and a tail."""
    from capmerge import _native

    g = torch.Generator().manual_seed(3)
    n = 5 * 1024 + 37
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    for k in (2, 3, 4, 5, 6):  # the fused tile unrolled for 2 to 4 models, else not
        ins = [(_mv((base.float() + torch.randn(n, generator=g) * 1e-3).bfloat16()), 2) for _ in range(k)]
        got = []
        for fused in (1, 2, 0):  # the fused tile (AVX-512 where the CPU has it), the AVX2 one, the tile loops
            prev = _native.use_fast_merge(fused)
            try:
                var, bits, sums = np.zeros(n, np.float32), np.zeros((n + 7) // 8, np.uint8), np.zeros(k)
                nnz = _native.sce(ins, _mv(base), 2, n, 0, var, 0.0, None, None)
                thr = float(np.quantile(var, 0.6))
                nnz2 = _native.sce(ins, _mv(base), 2, n, 0, None, thr, bits, sums)
                got.append((nnz, nnz2, var.tobytes(), bits.tobytes(), sums.tobytes()))
            finally:
                _native.use_fast_merge(prev)
        assert got[0] == got[1] == got[2], k


@pytest.mark.parametrize("fused", [1, 2, 0])  # fused (AVX-512 or AVX2), AVX2, tiles
def test_sce_sums_are_added_in_sixteen_lanes_per_tile(fused: int) -> None:
    """sce()'s float64 sums of squares, bit for bit, in their documented order: per tile of 1024 elements, element j
    of the tile into lane j % 16 in order, the lanes added as ((l0 + l8) + (l4 + l12)) + ((l1 + l9) + (l5 + l13)) + …,
    the tiles in order; with keep bits (a dropped entry adds nothing) and without. Values of a few scales, so that
    another order rounds differently (the test checks that it does)."""
    from capmerge import _native

    g = torch.Generator().manual_seed(11)
    n, k, tile = 3 * 1024 + 37, 3, 1024
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    scale = torch.exp2(torch.randint(-3, 3, (n,), generator=g).float())
    models = [base.float() + torch.randn(n, generator=g) * scale for _ in range(k)]  # float32: 24-bit differences
    taus = [m - base.float() for m in models]
    var = torch.var(torch.stack(taus), dim=0, unbiased=False)
    thr = float(var.median())
    ins = [(_mv(m), compute.NATIVE_CODES["F32"]) for m in models]

    def ordered(x: list[float], keep: list[bool]) -> float:
        total = 0.0
        for t0 in range(0, n, tile):
            lanes = [0.0] * 16
            for j in range(t0, min(n, t0 + tile)):
                if keep[j]:
                    lanes[(j - t0) % 16] += x[j] * x[j]  # exact product of float32 values in float64
            quads = [(lanes[q] + lanes[q + 8]) + (lanes[q + 4] + lanes[q + 12]) for q in range(4)]
            total += (quads[0] + quads[1]) + (quads[2] + quads[3])
        return total

    keep = (var >= thr).tolist()
    prev = _native.use_fast_merge(fused)
    differs = False
    try:
        for bits in (np.zeros((n + 7) // 8, np.uint8), None):
            sums = np.zeros(k)
            _native.sce(ins, _mv(base), 2, n, 0, None, thr if bits is not None else 0.0, bits, sums)
            for i in range(k):
                x = taus[i].double().tolist()
                want = ordered(x, keep if bits is not None else [True] * n)
                assert sums[i] == want, (i, bits is None)
                plain = 0.0  # one sum in element order
                for v, kp in zip(x, keep, strict=True):
                    plain += v * v if kp or bits is None else 0.0
                differs = differs or plain != want
    finally:
        _native.use_fast_merge(prev)
    assert differs  # the data tells the orders apart


@pytest.mark.parametrize("m", [1, 7, 1000, 5000])
def test_importance_is_the_scaled_difference_of_each_row(m: int) -> None:
    """importance(): |a − b|·scale[row] in float32 (torch's rounding) for a block starting mid-row, written out as
    it is, above 0 or as the magnitudes below 0, with the count below 0; and the bits of ≥ thr at a byte-aligned
    offset, also with the entries of a band [lo, thr) listed beside them."""
    from capmerge import _native

    g = torch.Generator().manual_seed(m)
    rows = 7
    n_all = rows * m
    a = torch.randn(n_all, generator=g).bfloat16()
    b = torch.randn(n_all, generator=g).to(torch.float16)
    scale = torch.rand(rows, generator=g) * 3 - 1  # a KL divergence can round below 0
    want = (a.float() - b.float()).abs() * scale.repeat_interleave(m)
    sc = memoryview(scale.numpy()).cast("B")
    for start, end in ((0, n_all), (m // 2 + 3, n_all - 1), (8, min(n_all, 8 + 3 * m))):
        n = end - start
        if n <= 0:
            continue
        w = want[start:end]
        for part, expect in ((0, w), (1, torch.where(w < 0, 0.0, w)), (2, torch.where(w < 0, -w, 0.0))):
            out = torch.empty(n)
            neg = _native.importance(_mv(a[start:end]), 2, _mv(b[start:end]), 1, n, start, m, sc, 0.0,
                                     memoryview(out.numpy()).cast("B"), None, part)  # fmt: skip
            assert torch.equal(out, expect) and neg == int((w < 0).sum())
        if start % 8 == 0:
            thr = float(want.median())
            bits = np.zeros((n_all + 7) // 8, dtype=np.uint8)
            _native.importance(_mv(a[start:end]), 2, _mv(b[start:end]), 1, n, start, m, sc, thr, None, bits)
            got = np.unpackbits(bits, bitorder="little")[start:end].astype(bool)
            assert np.array_equal(got, (want[start:end] >= thr).numpy())
            # with a band [lo, thr): the same bits, and the entries inside listed (index in the tensor, I) in order;
            # with room for two only, the count still says how many there were
            lo = float(want.quantile(0.3))
            inside = torch.nonzero((w >= lo) & (w < thr)).flatten()
            for room in (n, 2):
                bits[:] = 0
                idx, val = np.zeros(room, dtype=np.uint64), np.zeros(room, dtype=np.float32)
                out = torch.empty(n)
                neg, count = _native.importance(_mv(a[start:end]), 2, _mv(b[start:end]), 1, n, start, m, sc, thr,
                                                memoryview(out.numpy()).cast("B"), bits, 1, lo, idx, val)  # fmt: skip
                assert count == len(inside) and neg == int((w < 0).sum())
                assert torch.equal(out, torch.where(w < 0, 0.0, w))
                assert np.array_equal(np.unpackbits(bits, bitorder="little")[start:end].astype(bool), got)
                listed = min(room, count)
                assert np.array_equal(idx[:listed], (inside[:listed] + start).numpy())
                assert np.array_equal(val[:listed], w[inside[:listed]].numpy())
    with pytest.raises(ValueError, match="index and value"):
        _native.importance(_mv(a), 2, _mv(b), 1, n_all, 0, m, sc, 0.0, None, None, 1, 0.0, np.zeros(4, np.uint64))
    with pytest.raises(ValueError, match="one float32 scale per row"):
        _native.importance(_mv(a), 2, _mv(b), 1, n_all, 0, m, memoryview(bytearray(4)), 0.0, None, None)


def _kl_reference(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """KL(softmax(a) + eps ‖ softmax(b) + eps) of each row in float64 (numpy)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):  # a row of -inf only: NaN
        p = np.exp(a - a.max(-1, keepdims=True))
        q = np.exp(b - b.max(-1, keepdims=True))
        p, q = p / p.sum(-1, keepdims=True) + eps, q / q.sum(-1, keepdims=True) + eps
        return (p * np.log(p / q)).sum(-1)


def _kl_rows_on_every_loop(a: torch.Tensor, b: torch.Tensor, codes: tuple[int, int]) -> tuple[np.ndarray, int]:
    """row_kl() of the rows of a and b, and its count of I < 0, on the fastest loop (AVX-512 where the CPU has it),
    AVX2 at most and plain C, asserted to give the same bits and count."""
    from capmerge import _native

    rows, m = a.shape
    outs = []
    for path in (0, 1, 2):
        out = np.empty(rows, dtype=np.float32)
        below = _native.row_kl(_mv(a), codes[0], _mv(b), codes[1], rows, m, out, path)
        outs.append((out, below))
    assert all(o.tobytes() == outs[0][0].tobytes() and n == outs[0][1] for o, n in outs[1:])
    return outs[0]


@pytest.mark.parametrize("codes", [(0, 0), (2, 1)])
@pytest.mark.parametrize("m", [1, 3, 8, 13, 21, 4105, 5632, 65536, 65537])
def test_row_kl_against_a_float64_reference(m: int, codes: tuple[int, int]) -> None:
    """row_kl(): each row's KL within 3e-7 + 1e-5·|KL| of numpy's float64 on the same (widened) inputs, for rows of
    models near the base (KL ~1e-4, some rounding below 0) and far from it, peaked rows and rows with -inf; the
    AVX-512, AVX2 and plain C loops give the same bits (rows whose KL the moments settle and rows that take the third
    pass, kl_by_moments); a NaN or +inf in a row (or -inf only) makes its KL the NaN 0x7fc00000; the count is that of
    |a − b|·KL < 0 in float32."""
    from capmerge import _native

    dts = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
    g = torch.Generator().manual_seed(m)
    rows = 40
    base = torch.randn(rows, m, generator=g) * torch.rand(rows, 1, generator=g) * 4
    spread = torch.exp2(torch.randint(-16, 1, (rows, 1), generator=g).float())
    model = base + torch.randn(rows, m, generator=g) * spread
    model[1, 0] = 60.0  # a peaked row
    model[2, m // 2] = -float("inf")
    a, b = model.to(dts[codes[0]]), base.to(dts[codes[1]])
    a[0] = b[0].to(a.dtype)  # the same row (bf16 values are float16's in this range): KL 0
    b[0] = a[0].to(b.dtype)
    a[3, m - 1], b[4, 0] = float("nan"), float("inf")
    got, below = _kl_rows_on_every_loop(a, b, codes)
    want = _kl_reference(a.float().numpy(), b.float().numpy())
    finite = np.isfinite(want)
    finite[[3, 4]] = False
    assert finite.sum() >= rows - 3 and np.isnan(got[~finite]).all()
    assert np.all(np.abs(got[finite] - want[finite]) <= 3e-7 + 1e-5 * np.abs(want[finite]))
    assert got[0] == 0.0
    assert set(got[~finite].view(np.uint32).tolist()) == {0x7FC00000}
    prod = (a.float() - b.float()).abs().numpy() * got[:, None]
    assert below == int((prod[finite] < 0).sum())
    with pytest.raises(ValueError, match="too small"):
        _native.row_kl(_mv(a), codes[0], _mv(b), codes[1], rows + 1, m, np.empty(rows + 1, np.float32))


@pytest.mark.parametrize("codes", [(0, 0), (2, 2)])
@pytest.mark.parametrize("m", [512, 5632, 65536])
def test_row_kl_of_a_finetune_within_1e6(m: int, codes: tuple[int, int]) -> None:
    """Rows like a finetune's against its base (weights ~0.02, changes ~1e-3: KL ~5e-7, where 1/Σexp rounded to
    float32 alone moves a KL by several percent, torch's float32 operations by up to a fifth, and the two exps'
    moments by up to 0.6 %): row_kl() within 1e-6 of numpy's float64 in every row, on every loop (the KL from the
    series' moments, one exp per entry: kl_by_series)."""
    dts = {0: torch.float32, 2: torch.bfloat16}
    g = torch.Generator().manual_seed(m)
    rows = 32 if m < 65536 else 6
    base = (torch.randn(rows, m, generator=g) * 0.02).to(dts[codes[1]])
    model = (base.float() + torch.randn(rows, m, generator=g) * 1e-3).to(dts[codes[0]])
    got, _ = _kl_rows_on_every_loop(model, base, codes)
    want = _kl_reference(model.float().numpy(), base.float().numpy())
    assert np.all(np.abs(got - want) <= 1e-6 * want)


def test_arcee_fusion_row_kl_without_the_native_kernel_in_float64(monkeypatch) -> None:
    """arcee_fusion's row_kl() where the native kernel is not taken (another device, or no kernel built): torch in
    float64, within 1e-6 of numpy's float64 on rows of a finetune, as the native KL is."""
    from capmerge.merge.methods import arcee_fusion as A

    g = torch.Generator().manual_seed(5)
    base = torch.randn(16, 2048, generator=g) * 0.02
    model = base + torch.randn(16, 2048, generator=g) * 1e-3
    native = A.row_kl(model, base).numpy()
    monkeypatch.setattr(compute, "native_available", lambda: False)
    got = A.row_kl(model, base)
    want = _kl_reference(model.numpy(), base.numpy())
    assert got.dtype == torch.float32
    assert np.all(np.abs(got.numpy() - want) <= 1e-6 * want)
    assert np.all(np.abs(native - want) <= 1e-6 * want)


@pytest.mark.parametrize(("m", "scale", "change"), [(16384, 0.02, 0.1), (4096, 0.5, 0.05), (65536, 0.02, 0.02)])
def test_row_kl_keeps_mergekits_epsilon(m: int, scale: float, change: float) -> None:
    """Rows where mergekit's 1e-8, added to p and q, moves the KL by 4e-5 to 7e-4 of itself (numpy's float64 with and
    without it): row_kl() within 1e-5 of the value with it, on every loop."""
    g = torch.Generator().manual_seed(m)
    base = torch.randn(6, m, generator=g) * scale
    model = base + torch.randn(6, m, generator=g) * change
    got, _ = _kl_rows_on_every_loop(model, base, (0, 0))
    want = _kl_reference(model.numpy(), base.numpy())
    without = _kl_reference(model.numpy(), base.numpy(), eps=0.0)
    assert np.all(np.abs(without - want) > 4e-5 * want)
    assert np.all(np.abs(got - want) <= 1e-5 * want)


@pytest.mark.parametrize("codes", [(2, 2), (1, 0), (0, 0)])
@pytest.mark.parametrize("m", [8, 520, 4104])
def test_row_kl_scan_counts_lists_and_bits_as_numpy_does(m: int, codes: tuple[int, int]) -> None:
    """row_kl_scan(): the rows' KL as row_kl() makes it, and of I = |a − b|·KL (float32, as importance() makes it)
    what numpy finds in it: how many lie below each bracket's lo, the values inside any [lo, hi) in element order,
    the NaN count (a NaN row), the bits of I ≥ hi of the band and the band's entries (index in the tensor, I) in
    order, at an offset that is not 0; with no room, a list reports -1 and the band counts on past its room, the
    ones written still the first. The AVX-512, AVX2 and plain C loops give the same results."""
    from capmerge import _native

    dts = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
    g = torch.Generator().manual_seed(m)
    rows = 24
    base = torch.randn(rows, m, generator=g)
    model = base + torch.randn(rows, m, generator=g) * torch.rand(rows, 1, generator=g)
    a, b = model.to(dts[codes[0]]), base.to(dts[codes[1]])
    a[5, m // 2] = float("nan")  # a NaN row
    kl = np.empty(rows, dtype=np.float32)
    _native.row_kl(_mv(a), codes[0], _mv(b), codes[1], rows, m, kl)
    i = (np.abs(a.float().numpy() - b.float().numpy()) * kl[:, None]).astype(np.float32).reshape(-1)
    fin = np.sort(i[~np.isnan(i)])
    at = [fin[int(q * len(fin))] for q in (0.2, 0.25, 0.45, 0.55, 0.7, 0.8, 0.9, 0.95)]
    brackets = ((at[0], at[1]), (at[2], at[3]), (at[4], at[5]))
    band = (at[6], at[7])
    n, offset = rows * m, 16
    want_listed = i[((i >= at[0]) & (i < at[1])) | ((i >= at[2]) & (i < at[3])) | ((i >= at[4]) & (i < at[5]))]
    inside = (i >= band[0]) & (i < band[1])
    want_bits = np.packbits(np.concatenate([np.zeros(offset, bool), i >= band[1]]), bitorder="little")
    results = []
    for path in (0, 1, 2):
        for room in ("enough", "none"):
            size = n if room == "enough" else 4
            col = np.zeros(n if room == "enough" else 0, dtype=np.float32)
            bits = np.zeros((offset + n + 7) // 8 + 1, dtype=np.uint8)
            idx, val = np.zeros(size, dtype=np.uint64), np.zeros(size, dtype=np.float32)
            out = np.empty(rows, dtype=np.float32)
            args = (rows, m, out, offset, brackets, col, bits, band, idx, val, path)
            below, nan, under, listed, nb = _native.row_kl_scan(_mv(a), codes[0], _mv(b), codes[1], *args)
            assert out.tobytes() == kl.tobytes() and below == 0 and nan == m
            assert under == tuple(int((i < lo).sum()) for lo, _ in brackets)
            assert np.array_equal(bits[: len(want_bits)], want_bits) and not bits[len(want_bits) :].any()
            assert nb == int(inside.sum()) > size or room == "enough"
            k = min(nb, size)
            assert np.array_equal(idx[:k], offset + np.flatnonzero(inside)[:k]) and np.array_equal(
                val[:k], i[inside][:k]
            )
            if room == "enough":
                assert listed == len(want_listed) and np.array_equal(col[:listed], want_listed)
            else:
                assert listed == -1
            results.append((room, out.tobytes(), under, listed, nb, bits.tobytes(), idx.tobytes(), val.tobytes()))
    assert all(r == results[j % 2] for j, r in enumerate(results))
    # without bits: none written, no band listed; a bad row length is refused
    col = np.zeros(n, dtype=np.float32)
    got = _native.row_kl_scan(_mv(a), codes[0], _mv(b), codes[1], rows, m, out, 0, brackets, col, None, band, idx, val)
    assert got[2:4] == (results[0][2], results[0][3]) and got[4] == 0
    with pytest.raises(ValueError, match="multiple of 8"):
        _native.row_kl_scan(_mv(a), codes[0], _mv(b), codes[1], 1, 4, out, 0, brackets, col, None, band, idx, val)


def test_every_cpu_cap_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CAPMERGE_NATIVE_CPU caps the native loops (avx2: no AVX-512 loop; baseline: plain C): each configuration the
    methods benchmark times (all eighteen methods, bf16) writes the same bytes under every cap, on checkpoints with
    tensors over 1 Mi entries (the statistics passes' large-tensor paths) and rows of 520 (a tail of 8 in sixteen
    lanes). On a CPU without AVX-512 the first two runs take the same loops."""
    import json
    import subprocess
    import sys

    from conftest import save_single
    from mergekit_ref import llama_tensors
    from safetensors import safe_open

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_methods import METHODS, config_text

    shapes = llama_tensors(hidden=256, intermediate=520, vocab=4100, layers=2)
    g = torch.Generator().manual_seed(11)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    dirs = {"P": tmp_path / "P"}
    save_single(dirs["P"] / "model.safetensors", {n: t.bfloat16() for n, t in base.items()})
    for k in "ABC":  # finetunes: the base and a change about a tenth of it, some entries changed more
        dirs[k] = tmp_path / k
        save_single(dirs[k] / "model.safetensors",
                    {n: (t + torch.randn(t.shape, generator=g) * 0.1 * torch.rand(t.shape, generator=g) ** 4).bfloat16()
                     for n, t in base.items()})  # fmt: skip
    cfgs = []
    for method in METHODS:
        (tmp_path / f"{method}.yml").write_text(config_text(method, dirs))
        cfgs.append((method, str(tmp_path / f"{method}.yml")))
    code = (
        "import json, sys\n"
        "from capmerge.cli import main\n"
        "for method, cfg in json.loads(sys.argv[1]):\n"
        "    assert main(['run', cfg, '-o', sys.argv[2] + '/' + method, '--quiet']) == 0, cfg\n"
    )
    caps = {"fastest": None, "avx2": "avx2", "baseline": "baseline"}
    for name, cap in caps.items():
        env = {k: v for k, v in os.environ.items() if k != "CAPMERGE_NATIVE_CPU"}
        env.update({"CAPMERGE_NATIVE_CPU": cap} if cap else {})
        r = subprocess.run([sys.executable, "-c", code, json.dumps(cfgs), str(tmp_path / name)], env=env,
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    for method, _ in cfgs:
        files = [tmp_path / name / method / "model.safetensors" for name in caps]
        with safe_open(files[0], "pt") as f0:
            names = sorted(f0.keys())
            want = {n: f0.get_tensor(n).view(torch.int16 if f0.get_tensor(n).dtype == torch.bfloat16 else
                                             f0.get_tensor(n).dtype) for n in names}  # fmt: skip
        for f in files[1:]:
            with safe_open(f, "pt") as fh:
                assert sorted(fh.keys()) == names, (method, f)
                for n in names:
                    t = fh.get_tensor(n)
                    got = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
                    assert torch.equal(got, want[n]), (method, f.parent.parent.name, n)


def test_an_unknown_cpu_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """CAPMERGE_NATIVE_CPU takes avx2 or baseline: anything else is one error line naming it (the C side would
    ignore it and take the fastest loops), nothing written."""
    from conftest import save_single

    from capmerge.cli import main

    a = save_single(tmp_path / "a.safetensors", {"w": torch.ones(4)})
    b = save_single(tmp_path / "b.safetensors", {"w": torch.zeros(4)})
    monkeypatch.setenv("CAPMERGE_NATIVE_CPU", "avx3")
    assert main(["diff", str(a), str(b), "-o", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: CAPMERGE_NATIVE_CPU must be avx2 or baseline (or unset), got 'avx3'"], err
    assert not (tmp_path / "t.safetensors").exists()
