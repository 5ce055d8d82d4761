"""The block form of the model-centric methods: its statistics pass (native and torch) against numpy in float64, the
runner taking the block path (and leaving it where the form does not apply), and the torch fallback."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from capmerge import functional as F
from capmerge.merge import compute, plan
from capmerge.merge.methods import blockform as B

CODES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _inputs(code: str, n: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * (0.5 + i)).to(CODES[code]) for i in range(k)]


def _reference(ts: list[torch.Tensor], base: torch.Tensor | None, prune, offset: int = 0):
    """Gram, L1 and pruned L1 in float64 with numpy, v_i = float32(θ_i − base) as the kernel rounds it, and the keep
    masks (numpy bool)."""
    vs = [(t.float() - base.float()) if base is not None else t.float() for t in ts]
    v64 = [v.double().numpy() for v in vs]
    gram = np.array([[float(np.dot(a, b)) for b in v64] for a in v64])
    l1 = [float(np.abs(a).sum()) for a in v64]
    kept, keeps = [], []
    for v, a, (mode, p1, p2, key) in zip(vs, v64, prune, strict=True):
        m = np.abs(a)
        if mode == B.MAGNITUDE:
            keep = m >= p1
        elif mode == B.BAND:
            keep = (m >= p1) & (m < p2)
        elif mode == B.RANDOM:
            u = F.philox_uniform(key, torch.arange(v.numel(), dtype=torch.int64) + offset).numpy()
            keep = u < np.float32(p1)
        else:
            keep = np.ones_like(m, dtype=bool)
        kept.append(float(m[keep].sum()))
        keeps.append(keep)
    return gram, l1, kept, keeps


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("code", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("with_base", [True, False])
def test_moments_match_numpy(code: str, with_base: bool, native: bool, monkeypatch) -> None:
    if not native:
        monkeypatch.setenv("CAPMERGE_NO_NATIVE", "1")
    elif not compute.native_available():
        pytest.skip("the native kernel is not built here")
    n, k = 3003, 3  # not a multiple of the kernel's tile, nor of its four or eight lanes
    ts = _inputs(code, n, k + 1)
    base, models = (ts[0], ts[1:]) if with_base else (None, ts[1:])
    thr = float((models[0].float() - (base.float() if base is not None else 0)).abs().median())
    prune = [(B.MAGNITUDE, thr, 0.0, 0), (B.RANDOM, 0.3, 0.0, 987654321), (B.BAND, thr / 2, thr * 2, 0)]
    out = np.zeros(k * k + 2 * k)
    views = [_raw(t) for t in models]
    B._moments_block(views, [code] * k, _raw(base) if base is not None else None, code, n, 5, 1, prune, out)
    gram, l1, kept, _ = _reference(models, base, prune, offset=5)
    np.testing.assert_allclose(out[: k * k].reshape(k, k), gram, rtol=1e-12)
    np.testing.assert_allclose(out[k * k : k * k + k], l1, rtol=1e-12)
    np.testing.assert_allclose(out[k * k + k :], kept, rtol=1e-12)
    assert kept[1] < l1[1] * 0.4 and kept[0] < l1[0]  # the masks dropped something


@pytest.mark.parametrize("code", ["F32", "BF16"])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize(
    ("n", "offset"),
    [
        (3003, 8),  # a tail that is not whole bytes of keep bits (the tile loop takes the last tile)
        (2056, 1024),  # whole bytes: the fused loop over every tile, 128 and then 8 elements at a time
        (2120, 8),  # a tail of 72 elements: 32, 32, then 8
        (4104, 2**34 - 1032),  # the high word of the counters (index // 4) changes inside a tile (the general rounds)
    ],
)
def test_dare_statistics_with_keep_bits_match_numpy(code: str, with_base: bool, n: int, offset: int) -> None:
    """DARE's statistics pass (random pruning, keep bits recorded, no Gram matrix: one fused loop per tile where
    the CPU has AVX-512) against numpy: the L1 sums, the kept L1 sums and every keep bit, a NaN and zeros included."""
    if not compute.native_available():
        pytest.skip("the native kernel is not built here")
    k = 3
    ts = _inputs(code, n, k + 1, seed=4)
    ts[2][17] = float("nan")
    ts[3][: n // 5] = ts[0][: n // 5]  # zero differences
    base, models = (ts[0], ts[1:]) if with_base else (None, ts[1:])
    prune = [(B.RANDOM, p, 0.0, key) for p, key in ((0.3, 11), (0.9, 2**40 + 5), (0.05, 2**63 + 77))]
    out = np.zeros(k * k + 2 * k)
    masks = [np.zeros((offset + n + 7) // 8, np.uint8) for _ in range(k)]  # calloc: untouched pages stay unmapped
    views = [_raw(t) for t in models]
    B._moments_block(views, [code] * k, _raw(base) if base is not None else None, code, n, offset, 0, prune, out, masks)
    _, l1, kept, keeps = _reference(models, base, prune, offset=offset)
    for i, keep in enumerate(keeps):
        bits = np.unpackbits(masks[i][offset // 8 :], bitorder="little")[offset % 8 : offset % 8 + n]
        assert np.array_equal(bits.astype(bool), keep), i
        if np.isnan(l1[i]):  # the model with the NaN
            assert np.isnan(out[k * k + i]) and np.isnan(out[k * k + k + i]) == bool(keep[17])
            continue
        np.testing.assert_allclose(out[k * k + i], l1[i], rtol=1e-12)
        np.testing.assert_allclose(out[k * k + k + i], kept[i], rtol=1e-12)
    assert list(out[: k * k]) == [0.0] * (k * k)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("l1", [True, False])
@pytest.mark.parametrize("code", ["F32", "BF16"])
def test_gram_sums_in_four_lanes_per_tile_bit_for_bit(k: int, l1: bool, code: str) -> None:
    """The Gram matrix of the statistics pass in its documented order, bit for bit: per tile of 1024 elements, element
    j of the tile into lane j % 4 in order (each product exact in float64), the lanes added as (l0 + l1) + (l2 + l3)
    and the tiles in order — for the AVX2 loops (2 to 4 models: from the tiles, or straight from the inputs when the
    Gram matrix is all that is asked for) and the pair loops (5) alike; τ = θ_i − base in float32 (bf16 inputs) or
    the vectors themselves. Values of several scales, so that another order rounds differently."""
    if not compute.native_available():
        pytest.skip("the native kernel is not built here")
    g = torch.Generator().manual_seed(k)
    n, tile = 2 * 1024 + 37, 1024  # the last tile not a multiple of 8: the loops from the tiles
    dt = torch.float32 if code == "F32" else torch.bfloat16
    ts = [(torch.randn(n, generator=g) * torch.exp2(torch.randint(-6, 6, (n,), generator=g).float())).to(dt)
          for _ in range(k + 1)]  # fmt: skip
    base = ts[0] if code == "BF16" else None
    out = np.zeros(k * k + 2 * k)
    B._moments_block([_raw(t) for t in ts[1:]], [code] * k, _raw(base) if base is not None else None, code, n, 0,
                     1 if l1 else 3, [B.KEEP_ALL] * k, out)  # fmt: skip
    xs = [(t.float() - base.float() if base is not None else t.float()).double().tolist() for t in ts[1:]]
    for i in range(k):
        for m in range(i, k):
            want = 0.0
            for t0 in range(0, n, tile):
                lanes = [0.0] * 4
                for j in range(t0, min(n, t0 + tile)):
                    lanes[(j - t0) % 4] += xs[i][j] * xs[m][j]
                want += (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
            assert out[i * k + m] == want and out[m * k + i] == want, (i, m)


def test_moments_skip_l1_of_unpruned_and_the_gram_on_request() -> None:
    if not compute.native_available():
        pytest.skip("the native kernel is not built here")
    ts = _inputs("BF16", 1000, 2, seed=3)
    out = np.zeros(8)
    prune = [B.KEEP_ALL, (B.MAGNITUDE, 0.5, 0.0, 0)]
    B._moments_block([_raw(t) for t in ts], ["BF16"] * 2, None, "F32", 1000, 0, 2, prune, out)
    _, _, kept, _ = _reference(ts, None, prune)
    assert list(out[:6]) == [0.0] * 6 and out[6] == 0.0
    np.testing.assert_allclose(out[7], kept[1], rtol=1e-12)


def test_stats_are_the_same_for_any_reader_blocks() -> None:
    """Sums run over fixed STAT_BLOCK blocks: bf16 storage read in its own pieces gives the bits of float32 tensors."""
    n = B.STAT_BLOCK + 12345
    ts = _inputs("BF16", n, 3, seed=1)
    wide = [t.float() for t in ts]
    raw16, raw32 = [_raw(t) for t in ts], [_raw(t) for t in wide]
    s16 = B.Stats(lambda i, s, e: raw16[i][2 * s : 2 * e], ["BF16"] * 3, True, n)
    s32 = B.Stats(lambda i, s, e: raw32[i][4 * s : 4 * e], ["F32"] * 3, True, n)
    for kw in ({"relative": True}, {"include_base": True}, {"relative": True, "l1": True, "gram": False}):
        a, b = s16.moments(**kw), s32.moments(**kw)
        assert (a.gram, a.l1, a.kept) == (b.gram, b.l1, b.kept), kw
    assert s16.kth_abs(0, [7, 1000]) == s32.kth_abs(0, [7, 1000])
    tau = (wide[1] - wide[0]).abs().sort(descending=True).values
    assert s16.kth_abs(0, [7, 1000]) == {7: float(tau[6]), 1000: float(tau[999])}


def test_stats_are_the_same_on_any_number_of_threads(monkeypatch) -> None:
    """A statistics pass dealt out to threads (blocks summed in order) gives the bits of one thread: Gram, L1,
    kept L1, DARE's keep bits, the thresholds of a bracketed pass, DELLA's and SCE's statistics."""
    n = 5 * B.STAT_BLOCK + 2000
    ts = _inputs("BF16", n, 4, seed=2)
    raw = [_raw(t) for t in ts]
    prune = [(B.RANDOM, 0.3, 0.0, 99), (B.MAGNITUDE, 0.01, 0.0, 0), B.KEEP_ALL]
    got = []
    for threads in ("1", "3"):
        monkeypatch.setenv("CAPMERGE_THREADS", threads)
        monkeypatch.setattr(B, "STAT_PARALLEL_MIN", 1)
        monkeypatch.setattr(plan, "THRESHOLD_PARALLEL_MIN", 1)
        st = B.Stats(lambda i, s, e: raw[i][2 * s : 2 * e], ["BF16"] * 4, True, n)
        m = st.moments(relative=True, prune=prune, l1=True, masks=True)
        got.append((m.gram, m.l1, m.kept, bytes(m.masks[0]), st.kth_abs_many({0: [5, n // 3], 2: [n // 100]})))
        # the statistics of DELLA (rows of 240: n = 10931 rows), SCE (count, variance threshold, bits, energies)
        assert n % 240 == 0
        l1, kept, bits = st.della([(1, *F.della_bounds(0.4, 0.2), 77)], 240)[1]
        nnz = st.sce(sums=False)[0]
        thr = st.sce_variance_kth([nnz // 3])[nnz // 3]
        got[-1] += (l1, kept, bytes(bits), nnz, thr, st.sce(thr)[1], bytes(st.sce(thr)[2]))
    assert got[0] == got[1]
    tau = (ts[1].float() - ts[0].float()).abs().sort(descending=True).values
    assert got[0][4][0] == {5: float(tau[4]), n // 3: float(tau[n // 3 - 1])}


@pytest.mark.parametrize("case", ["spread", "ties", "negative", "nan", "tiny"])
def test_arcee_fusion_quantiles_are_the_sorted_elements(case: str) -> None:
    """arcee_fusion's exact quantiles (native selection for entries ≥ 0, torch.kthvalue otherwise) are the elements
    of those ranks in torch.sort's order."""
    from capmerge.merge.methods.arcee_fusion import ranked

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3_000_001, generator=g) * torch.exp2(torch.randint(-20, 20, (3_000_001,), generator=g))).abs()
    if case == "ties":
        x = x.bfloat16().float()
    elif case == "negative":
        x[::7] *= -1
    elif case == "nan":
        x[::1000] = float("nan")
    elif case == "tiny":
        x = x[:3]
    n = x.numel()
    ranks = [int(q * (n - 1)) for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
    want = torch.sort(x).values[ranks]
    got = ranked(x, ranks)
    assert torch.equal(got, want) or (case == "nan" and torch.equal(got[:-1], want[:-1]) and got[-1].isnan())


@pytest.mark.parametrize("blocks", ["one block", "blocks on 3 threads"])
@pytest.mark.parametrize("shape", [(64, 384), (4097,), (300, 33)])
def test_arcee_fusion_block_form_with_kl_below_zero(shape: tuple[int, ...], blocks: str, monkeypatch) -> None:
    """A model the base shifted by 1e-3 within rounding: the KL's float32 rounding (~1e-7 of E_p[d²]) outweighs the
    rows' own (of the spread of d), so many rows' KL rounds below 0, and I does too (a 1-D tensor is one such row:
    every I ≤ 0). The block form ranks those first by magnitude, as the sorted order does: the torch
    function's bits — also with the rows' KL made in blocks of a few rows dealt out to three threads."""
    from capmerge.merge.methods import arcee_fusion as A
    from capmerge.merge.methods.models import TensorInputs

    if blocks != "one block":
        monkeypatch.setattr(A, "KL_BLOCK", 3 * shape[-1] - 1)  # two whole rows per block
        monkeypatch.setenv("CAPMERGE_THREADS", "3")

    for seed in range(100):  # the first draw with a row whose KL rounds below 0
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(shape, generator=g)
        model = base + 1e-3 + 1e-7 * torch.randn(shape, generator=g)
        if bool((A.row_kl(model, base) < 0).any()):
            break
    assert bool((A.row_kl(model, base) < 0).any())
    x = TensorInputs("w", [model], [{}], {}, base=base)
    assert torch.equal(A.MODEL_METHODS[0].fn(x), A._arcee_fusion(x))


@pytest.mark.parametrize("room", ["enough", "too little"])
@pytest.mark.parametrize("bracket", [True, False])
@pytest.mark.parametrize("change", ["large", "small"])
def test_arcee_fusion_keep_bits_from_the_level1_pass(monkeypatch, room: str, bracket: bool, change: str) -> None:
    """The keep bits made in the quartiles' level-1 pass from the threshold's bounds (the entries between them
    decided once it is known), or — a block with no room for its undecided entries — by a pass of their own: the
    torch function's bits either way, from the sampled bracket or the full count, and with rows whose KL rounds
    below 0 (small changes: the first quartile among the I < 0) or none."""
    from capmerge.merge.methods import arcee_fusion as A
    from capmerge.merge.methods.models import TensorInputs

    monkeypatch.setattr(plan, "BRACKET", bracket)
    monkeypatch.setattr(plan, "BRACKET_MIN", 1 << 12)
    monkeypatch.setattr(plan, "HIST_BLOCK", 1 << 14)  # several blocks, on several threads
    monkeypatch.setenv("CAPMERGE_THREADS", "3")
    if room != "enough":
        monkeypatch.setattr(A, "BAND_MIN", 1)
        monkeypatch.setattr(A, "BAND_SHARE", 1 << 30)
    settled: list[bool] = []
    settles = A._Band.settles
    monkeypatch.setattr(A._Band, "settles", lambda self, n, thr: settled.append(settles(self, n, thr)) or settled[-1])
    g = torch.Generator().manual_seed(11)
    base = torch.randn(300, 700, generator=g) * (1.0 if change == "large" else 0.05)
    if change == "large":
        model = base + torch.randn(300, 700, generator=g) * torch.rand(300, 1, generator=g)
    else:  # two thirds shifted by 1e-2 within a few roundings (the KL's own rounding decides its sign, see above),
        # a third of changes ~5e-5: their I spread out, several per block between the threshold's bounds
        model = base + 1e-2 + torch.randn(300, 700, generator=g) * (1 + 0.1 * torch.rand(300, 1, generator=g)) * 3e-7
        model[200:] = base[200:] + torch.randn(100, 700, generator=g) * torch.rand(100, 1, generator=g) * 5e-5
    below = float(((model - base).abs() * A.row_kl(model, base).unsqueeze(-1) < 0).float().mean())
    assert below == 0.0 if change == "large" else 0.25 < below < 0.5  # small: Q(¼) among the I < 0, Q(½) not
    x = TensorInputs("w", [model], [{}], {}, base=base)
    assert torch.equal(A.MODEL_METHODS[0].fn(x), A._arcee_fusion(x))
    assert settled == [room == "enough"]


@pytest.mark.parametrize(
    "case",
    [
        "settled",
        "kl below 0",
        "rows far apart",
        "nan row",
        "bracket missed",
        "no room to list",
        "no room in the band",
        "unbounded",
    ],  # fmt: skip
)
def test_arcee_fusion_quartiles_and_bits_from_the_kl_pass(monkeypatch, case: str) -> None:
    """The quartiles and keep bits made in the rows' KL pass from a sample's brackets (rows of a multiple of 8): the
    torch function's bits — whose quartiles come from a selection over the whole — where the pass settles them; and
    where it cannot (rows whose KL rounds below 0 or not, as noise decides, so that the sample's rows disagree: wide
    brackets, too wide to try; rows of spreads far apart, the same; a NaN row outside the sample, a
    quartile outside its bracket, no room to list the values inside, no room for the band's entries or a bracket
    without a finite end), through the passes of before or the bits' own pass, with the same bits."""
    from capmerge.merge.methods import arcee_fusion as A
    from capmerge.merge.methods.models import TensorInputs

    monkeypatch.setattr(plan, "BRACKET_MIN", 1 << 12)
    monkeypatch.setattr(A, "SCAN_SAMPLE", 1 << 12)
    monkeypatch.setattr(A, "SCAN_ROWS", 64)
    monkeypatch.setattr(A, "SCAN_RUNS", 16)
    monkeypatch.setattr(A, "KL_BLOCK", 1 << 14)  # blocks of 32 rows, on three threads
    monkeypatch.setenv("CAPMERGE_THREADS", "3")
    if case == "bracket missed":
        monkeypatch.setattr(A, "SCAN_SIGMAS", 0.0)
        monkeypatch.setattr(A, "SCAN_SLACK", 0.0)
    elif case == "no room to list":
        monkeypatch.setattr(A, "LIST_SHARE", 1 << 30)
    elif case == "no room in the band":
        monkeypatch.setattr(A, "BAND_MIN", 1)
        monkeypatch.setattr(A, "BAND_SHARE", 1 << 30)
    elif case == "unbounded":
        monkeypatch.setattr(A, "SCAN_SLACK", 0.3)  # Q(¾)'s bracket reaches past the sample's largest: no end
        monkeypatch.setattr(A, "LIST_SHARE", 1)
        monkeypatch.setattr(A, "SCAN_WIDEST", 2.0)
    routes: list[object] = []  # None: not tried; False: the quartiles not settled; True: the bits made; else thr
    scanned = A._scanned

    def route(got: object) -> object:
        return got if got is None else False if got.thr is None else True if got.bits_made else got.thr

    monkeypatch.setattr(A, "_scanned", lambda *a: routes.append(route(got := scanned(*a))) or got)
    g = torch.Generator().manual_seed(7)
    small = case == "kl below 0"
    base = torch.randn(600, 512, generator=g) * (0.05 if small else 1.0)
    scale = (1 + 0.1 * torch.rand(600, 1, generator=g)) * (4e-7 if small else 1.0)  # rows of about one spread
    if case == "rows far apart":  # spreads 1/16 to 8: the sample's rows disagree, the brackets would be wide
        scale = torch.exp2(torch.randint(-4, 4, (600, 1), generator=g).float())
    model = base + (1e-2 if small else 0.0) + torch.randn(600, 512, generator=g) * scale  # small: see above
    if case == "nan row":
        model[9, 100] = float("nan")  # the sample's runs start at rows 0, 39, 79, ...: not in it
    if small:
        below = float(((model - base).abs() * A.row_kl(model, base).unsqueeze(-1) < 0).float().mean())
        assert 0.25 < below < 0.5  # Q(¼) among the I < 0
    x = TensorInputs("w", [model], [{}], {}, base=base)
    assert torch.equal(A.MODEL_METHODS[0].fn(x).view(torch.int32), A._arcee_fusion(x).view(torch.int32))
    wide = {"kl below 0": None, "rows far apart": None}  # brackets too wide: nothing tried
    want = {"settled": True, "no room in the band": float, "unbounded": float, **wide}.get(case, False)
    assert len(routes) == 1 and (routes[0] is want or isinstance(routes[0], float) and want is float)


@pytest.mark.parametrize("method", ["arcee_fusion", "sce"])
@pytest.mark.parametrize("bracket", [True, False])
def test_non_finite_changes_that_are_dropped_leave_the_base(monkeypatch, method: str, bracket: bool) -> None:
    """A model holding NaN and inf (a NaN row, scattered NaN, one inf): the block form gives the per-tensor torch
    function's bits — a dropped change is 0 on both paths, whether or not it is finite — and the dropped NaN/inf
    entries give the base's value."""
    from capmerge.merge.methods import arcee_fusion, sce
    from capmerge.merge.methods.models import TensorInputs
    from capmerge.merge.methods.registry import get_model_method

    monkeypatch.setattr(plan, "BRACKET", bracket)
    monkeypatch.setattr(plan, "BRACKET_MIN", 1 << 12)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 700, generator=g)
    models = [base + torch.randn(300, 700, generator=g) * torch.rand(300, 1, generator=g) for _ in range(3)]
    models[0][9] = float("nan")
    models[0][5, ::50] = float("nan")
    models[-1][7, 3] = float("inf")
    m = get_model_method(method)
    gp, mp = m.resolve({"select_topk": 0.3} if method == "sce" else {}, [None] * (1 if method != "sce" else 3))
    x = TensorInputs("w", models[:1] if method != "sce" else models, mp, gp, base, 0)
    got = m.fn(x)
    want = arcee_fusion._arcee_fusion(x) if method != "sce" else sce._sce(x)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    if method != "sce":  # the rows holding NaN or inf have a NaN KL: dropped whole
        assert torch.equal(got[9], base[9]) and torch.equal(got[5], base[5]) and not got.isnan().any()


def test_thread_scratch_passes_buffers_to_the_next_threads(monkeypatch) -> None:
    """The next pass takes the buffers the last pass's threads made instead of making new ones."""
    from capmerge.merge.engine import parallel_map

    monkeypatch.setenv("CAPMERGE_THREADS", "2")
    scratch = plan.ThreadScratch()

    def used(_: int) -> int:
        view = scratch.get(1000)
        view[:] = b"x" * 1000  # written before read, as callers do
        time.sleep(0.2)  # both threads hold a buffer at once (a descheduled submitter could otherwise reuse one)
        return id(view.obj)

    first = set(parallel_map(used, [0, 1]))
    assert len(first) == 2
    assert set(parallel_map(used, [0, 1])) == first


def test_parallel_map_keeps_its_threads_and_returns_only_when_all_is_done(monkeypatch) -> None:
    """The passes run on the same threads each time (no new arenas for malloc), results in item order; when an item
    fails, the call raises only once the others have stopped (nothing of it runs on), and runs again afterwards."""
    import threading

    from capmerge.merge.engine import parallel_map

    monkeypatch.setenv("CAPMERGE_THREADS", "2")

    def ident(x: int) -> tuple[int, int]:
        time.sleep(0.05)
        return x, threading.get_ident()

    first = parallel_map(ident, list(range(6)))
    second = parallel_map(ident, list(range(6)))
    assert [x for x, _ in first] == list(range(6)) and [x for x, _ in second] == list(range(6))
    assert {t for _, t in second} == {t for _, t in first} and threading.get_ident() not in {t for _, t in first}
    finished: list[int] = []

    def fails_first(x: int) -> int:
        if x == 0:
            raise ValueError("item 0")
        time.sleep(0.3)
        finished.append(x)
        return x

    with pytest.raises(ValueError, match="item 0"):
        parallel_map(fails_first, [0, 1, 2, 3])
    done = list(finished)
    time.sleep(0.5)
    assert finished == done  # nothing ran on after the call returned
    assert parallel_map(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]


@pytest.mark.parametrize("shape", [(), (1,), (5, 1), (1, 7), (3, 4, 5), (0, 3)])
def test_statistics_methods_keep_every_shape(shape: tuple[int, ...]) -> None:
    """della, sce and arcee_fusion on scalars, single rows and columns, 3-D and empty tensors: the input's shape out,
    and what the formulas give there (sce over one model selects nothing: θ₀; DARE at density 0: θ₀)."""
    from capmerge.merge.methods.models import TensorInputs
    from capmerge.merge.methods.registry import get_model_method

    g = torch.Generator().manual_seed(len(shape))
    b = torch.randn(shape, generator=g)
    ms = [b + 0.1 * torch.randn(shape, generator=g) for _ in range(2)]

    def run(name: str, models: list, params: dict, mp: list) -> torch.Tensor:
        m = get_model_method(name)
        gp, mps = m.resolve(params, mp)
        return m.fn(TensorInputs("t", models, mps, gp, b, 0))

    for out in (run("della", ms, {}, [{"weight": 0.5, "density": 0.5}] * 2),
                run("sce", ms, {"select_topk": 0.5}, [None] * 2), run("arcee_fusion", ms[:1], {}, [None])):  # fmt: skip
        assert out.shape == b.shape
    assert torch.equal(run("sce", ms[:1], {"select_topk": 0.5}, [None]), b)
    assert torch.equal(run("dare_ties", ms, {"normalize": True}, [{"weight": 0.5, "density": 0.0}] * 2), b)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_sce_variance_is_torch_var(k: int) -> None:
    """sce's elementwise variance gives torch.var's bits (population, over the models), for spreads of every scale,
    zeros, and ±inf/NaN entries."""
    from capmerge.functional import population_variance

    g = torch.Generator().manual_seed(k)
    shape = (1000, 257)
    taus = [
        (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape, generator=g))) for _ in range(k)
    ]
    taus[0][::7] = 0.0
    taus[-1][3, :5] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e38, -1e38])
    ref = torch.var(torch.stack(taus), dim=0, unbiased=False)
    got = population_variance(taus)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got[~ref.isnan()], ref[~ref.isnan()])


# ------------------------------------------------------------------------------------------------- the runner


def _models(tmp_path, n_models: int = 3):
    g = torch.Generator().manual_seed(7)
    shapes = {"model.embed_tokens.weight": (96, 16), "model.layers.0.mlp.up_proj.weight": (32, 16),
              "model.layers.1.mlp.up_proj.weight": (32, 16), "model.norm.weight": (16,)}  # fmt: skip
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    paths = {"P": tmp_path / "P.safetensors"}
    save_file(base, paths["P"])
    for i in range(n_models):
        m = {n: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
        paths[f"M{i}"] = tmp_path / f"M{i}.safetensors"
        save_file(m, paths[f"M{i}"])
    return paths


def _spec(method: str, paths, params: dict | None = None, per_model: list[dict] | None = None, base: bool = True):
    from capmerge.merge.modelmerge import MergeSpec, SourceSpec

    ms = [k for k in paths if k != "P"]
    per_model = per_model or [{}] * len(ms)
    sources = [SourceSpec(str(paths[k]), pm or None) for k, pm in zip(ms, per_model, strict=True)]
    return MergeSpec(method, models=sources, base=str(paths["P"]) if base else None, parameters=params or {})


@pytest.mark.parametrize(
    ("method", "params", "per_model", "block"),
    [
        ("ties", {}, [{"weight": 1.0, "density": 0.5}] * 3, True),
        ("ties", {}, [{"weight": -1.0, "density": 0.5}] + [{"weight": 1.0, "density": 0.5}] * 2, False),
        ("ties", {"rescale": True}, [{"weight": 1.0, "density": 0.5}] * 3, False),
        ("dare_linear", {}, [{"weight": 0.5, "density": 0.5}] * 3, True),
        ("della", {}, [{"weight": 0.5, "density": 0.5}] * 3, True),
        ("della_linear", {}, [{"weight": 0.5, "density": 0.4, "epsilon": 0.3}] * 3, True),
        ("slerp", {"t": 0.4}, None, True),
        ("nearswap", {"t": 0.05}, None, True),
        ("model_stock", {"filter_wise": True}, None, "1-D"),  # one ratio per row; a 1-D tensor is one row
        ("sce", {}, None, True),
        ("sce", {"select_topk": 0.3}, None, True),
        ("arcee_fusion", {}, None, True),
    ],
)  # fmt: skip
def test_runner_takes_the_block_path_where_the_form_applies(tmp_path, method, params, per_model, block) -> None:
    from capmerge.merge.methods.models import TensorInputs
    from capmerge.merge.methods.registry import get_model_method
    from capmerge.merge.modelmerge import _jobs, plan, run_merge

    paths = _models(tmp_path, 1 if method in ("slerp", "nearswap", "arcee_fusion") else 3)
    spec = _spec(method, paths, params, per_model)
    p = plan(spec)
    try:
        jobs, _ = _jobs(p, None, False)
        ops = {j.name: j.op for j in jobs}
    finally:
        p.close()
    for n, op in ops.items():
        on_block = block is True or (block == "1-D" and n == "model.norm.weight")
        assert op == ("compute" if on_block else "copy"), ops
    out = tmp_path / "out.safetensors"
    run_merge(spec, out)
    got = load_file(out)
    m = get_model_method(method)
    models = {k: load_file(v) for k, v in paths.items()}
    keys = [k for k in paths if k != "P"]
    gp, mp = m.resolve(params, per_model or [None] * len(keys))
    for n, t in got.items():  # the runner (either path) gives the per-tensor fn's bits
        x = TensorInputs(n, [models[k][n] for k in keys], mp, gp, models["P"][n], 0)
        assert torch.equal(t, m.fn(x).to(torch.bfloat16)), n


def test_torch_fallback_gives_the_native_result_within_float32_rounding(tmp_path, monkeypatch) -> None:
    if not compute.native_available():
        pytest.skip("the native kernel is not built here")
    from capmerge.merge.modelmerge import run_merge

    paths = _models(tmp_path)
    wd = [{"weight": 0.7, "density": 0.4}] * 3
    cases = [("ties", {}, wd), ("multislerp", {}, [{"weight": 1}] * 3), ("dare_ties", {}, wd), ("della", {}, wd),
             ("della_linear", {}, wd), ("sce", {"select_topk": 0.3}, None), ("sce", {}, None)]  # fmt: skip
    for c, (method, params, pm) in enumerate(cases):
        outs = []
        for native in ("", "1"):
            monkeypatch.setenv("CAPMERGE_NO_NATIVE", native)
            out = tmp_path / f"{c}-{method}{native}.safetensors"
            run_merge(_spec(method, paths, params, pm), out, open_opts=None)
            outs.append(load_file(out))
        for n in outs[0]:
            a, b = outs[0][n].float(), outs[1][n].float()
            assert float((a - b).abs().max()) <= 2**-7 * float(a.abs().max()), f"{method} {n}"


def test_arcee_fusion_torch_fallback_matches(tmp_path, monkeypatch) -> None:
    """arcee_fusion without the native kernel (the per-tensor torch function) gives the block path's bits."""
    from capmerge.merge.modelmerge import run_merge

    paths = _models(tmp_path, 1)
    outs = []
    for native in ("", "1"):
        monkeypatch.setenv("CAPMERGE_NO_NATIVE", native)
        out = tmp_path / f"arcee{native}.safetensors"
        run_merge(_spec("arcee_fusion", paths), out, open_opts=None)
        outs.append(load_file(out))
    for n in outs[0]:
        assert torch.equal(outs[0][n], outs[1][n]), n


def _save(path, tensors: dict[str, list | float]) -> str:
    save_file({n: torch.tensor(v, dtype=torch.float32) for n, v in tensors.items()}, str(path))
    return str(path)


def test_block_path_error_names_the_tensor_and_writes_nothing(tmp_path, capsys) -> None:
    """A statistics pass that fails (multislerp: three task vectors whose weighted unit mean is zero) is one error
    line naming the tensor, exit code 2, no output."""
    from capmerge.cli.app import main

    p = _save(tmp_path / "P.safetensors", {"w": [0.0, 0.0], "ok": [1.0, 1.0]})
    ms = [_save(tmp_path / f"M{i}.safetensors", {"w": v, "ok": [1.0 + i, 2.0]})
          for i, v in enumerate([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])]  # fmt: skip
    out = tmp_path / "out.safetensors"
    code = main(["merge", *ms, "--base", p, "--method", "multislerp", "--weights", "1,1,1", "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "w" in err[0], err
    assert "weighted mean of the unit vectors is zero" in err[0] and not out.exists()


def test_block_path_overflow_is_refused_unless_allowed(tmp_path, capsys) -> None:
    from capmerge.cli.app import main

    ms = [_save(tmp_path / f"M{i}.safetensors", {"w": [60000.0, 1.0]}) for i in range(2)]
    out = tmp_path / "out.safetensors"
    args = ["merge", *ms, "--method", "linear", "--weights", "1,1", "--no-normalize", "--dtype", "float16"]
    assert main([*args, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "NaN/Inf" in err and "w" in err and not out.exists()
    assert main([*args, "--allow-nonfinite", "-o", str(out), "-q"]) == 0
    got = load_file(out)["w"]
    assert torch.isinf(got[0]) and float(got[1]) == 2.0


def test_block_path_takes_empty_and_scalar_tensors(tmp_path) -> None:
    from capmerge.merge.modelmerge import MergeSpec, SourceSpec, run_merge

    def model(i: int) -> str:
        t = {"empty": torch.zeros(0, 4), "scalar": torch.tensor(1.0 + i), "v": torch.arange(4.0) * (i + 1)}
        save_file(t, str(tmp_path / f"M{i}.safetensors"))
        return str(tmp_path / f"M{i}.safetensors")

    base, a, b = model(0), model(1), model(2)
    wd = {"weight": 1.0, "density": 0.5}
    for method, params in [("ties", wd), ("multislerp", {"weight": 1.0}), ("model_stock", None), ("della", wd),
                           ("dare_ties", wd), ("sce", None), ("arcee_fusion", None)]:  # fmt: skip
        out = tmp_path / f"{method}.safetensors"
        sources = [SourceSpec(a, params)] + ([SourceSpec(b, params)] if method != "arcee_fusion" else [])
        run_merge(MergeSpec(method, models=sources, base=base), out)
        got = load_file(out)
        assert got["empty"].shape == (0, 4) and got["scalar"].shape == () and got["v"].shape == (4,), method
        assert torch.isfinite(got["scalar"]) and torch.isfinite(got["v"]).all(), method


@pytest.mark.parametrize("native", [True, False])
def test_keep_bits_replay_the_random_mask(native: bool, monkeypatch) -> None:
    """DARE's statistics pass records its keep bits; a merge term of mode BITS over them gives the bytes of the same
    term drawing its Philox numbers again (any block offset), natively and on the torch path."""
    if not native:
        monkeypatch.setenv("CAPMERGE_NO_NATIVE", "1")
    elif not compute.native_available():
        pytest.skip("the native kernel is not built here")
    n, key, d = 5000, 424242, 0.3
    t = _inputs("BF16", n, 1, seed=5)[0]
    raw = _raw(t)
    st = B.Stats(lambda i, s, e: raw[2 * s : 2 * e], ["BF16"], False, n)
    m = st.moments(prune=[(B.RANDOM, d, 0.0, key)], gram=False, l1=True, masks=True)
    u = F.philox_uniform(key, torch.arange(n, dtype=torch.int64))
    bits = np.unpackbits(m.masks[0], bitorder="little")[:n].astype(bool)
    assert np.array_equal(bits, (u < torch.tensor(d)).numpy())
    zero = bytearray(4 * n)
    for off in (0, 8, 13):  # a merge block may start anywhere
        k = n - off
        want, got = bytearray(2 * k), bytearray(2 * k)
        rnd = (raw[2 * off :], "BF16", None, "F32", 0.7, B.RANDOM, d, 0.0, key)
        compute.merge_block([(memoryview(want), "BF16", 1.0)], memoryview(zero)[: 4 * k], "F32", k, [rnd], offset=off)
        rep = (raw[2 * off :], "BF16", None, "F32", 0.7, B.BITS, 0.0, 0.0, 0, m.masks[0])
        compute.merge_block([(memoryview(got), "BF16", 1.0)], memoryview(zero)[: 4 * k], "F32", k, [rep], offset=off)
        assert want == got, off


def test_near_mode_native_and_torch_agree_with_the_formula(monkeypatch) -> None:
    """Mode NEAR (nearswap): base + clamp(t / max(|τ|, 1e-6), 0, 1)·τ, natively and on the torch path, against
    float32 arithmetic written out here."""
    n = 4099
    a, b = _inputs("F32", n, 2, seed=9)
    b[:7] = a[:7]  # τ = 0: weight t/1e-6 clamped to 1, τ stays 0
    tau = b - a
    w = (torch.tensor(0.05) / tau.abs().clamp(min=1e-6)).clamp(0, 1)
    want = a + w * tau
    for native in ("", "1"):
        monkeypatch.setenv("CAPMERGE_NO_NATIVE", native)
        out = torch.empty(n)
        term = (_raw(b), "F32", _raw(a), "F32", 1.0, B.NEAR, 0.05, 0.0, 0)
        compute.merge_block([(_raw(out), "F32", 1.0)], _raw(a), "F32", n, [term])
        assert torch.equal(out, want), native or "native"


def _check_sce_bits_and_sums(st: B.Stats, thr: float, var: torch.Tensor, taus: list[torch.Tensor]) -> None:
    """st.sce(thr)'s keep bits are var ≥ thr and its sums Σ v_i² over them (numpy float64)."""
    _, sums, bits = st.sce(thr)
    keep = (var >= thr).numpy()
    assert np.array_equal(np.unpackbits(bits, bitorder="little")[: len(keep)].astype(bool), keep)
    for i, t in enumerate(taus):
        x = t.double().numpy()
        assert sums[i] == pytest.approx(np.where(keep, x * x, 0.0).sum(), rel=1e-12)


@pytest.mark.parametrize("case", ["early", "no bracket", "list too long"])
def test_sce_keep_bits_and_energies_from_the_selection_pass(monkeypatch, case: str) -> None:
    """After SCE's selection, its keep bits (var ≥ the k-th largest) and energies Σ v_i² over the kept entries come
    from the selection's own pass (bits and sums above the bracket, the entries inside listed and finished once the
    threshold is known), against torch/numpy float64; without a bracket, or with a list that outgrows its room, from a
    pass of their own — the same bits, sums within float64 rounding."""
    if not compute.native_available():
        pytest.skip("the native kernel is not built here")
    monkeypatch.setattr(plan, "BRACKET", case != "no bracket")
    if case == "list too long":
        monkeypatch.setattr(B._SceEarly, "LIST_SHARE", 1 << 16)
    n = (1 << 21) + (1 << 20) + 5000  # two full pass blocks and a short one
    gen = torch.Generator().manual_seed(11)
    base = (torch.randn(n, generator=gen) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(n, generator=gen) * 0.002 * (i + 1)).to(dt)
              for i, dt in enumerate([torch.bfloat16, torch.float32, torch.bfloat16])]  # fmt: skip
    models[1][77] = float("nan")
    raw = [_raw(t) for t in [base, *models]]
    st = B.Stats(lambda i, s, e: raw[i][(2 if i != 2 else 4) * s : (2 if i != 2 else 4) * e],
                 ["BF16", "BF16", "F32", "BF16"], True, n)  # fmt: skip
    taus = [t.float() - base.float() for t in models]
    var = torch.var(torch.stack(taus), dim=0, correction=0)
    k, thr = st.sce_selection(0.3)
    assert k == int(int(torch.count_nonzero(var)) * 0.3)
    early = st._cache.get("sce_early")
    assert (early is not None and early.covers(thr)) == (case == "early")
    _check_sce_bits_and_sums(st, thr, var, taus)


def test_sce_selection_through_a_reader_that_reuses_its_buffer(monkeypatch) -> None:
    """SCE's selection and early keep bits as the engine's copying reader gives its inputs: each read into one buffer
    per input and thread, valid until that input's next read on that thread (the sample's pieces are gathered one by
    one; its last piece differs from the rest), on a tensor whose last pass block is exactly as long as a sample piece
    and starts where the last piece does — against torch."""
    if not compute.native_available():
        pytest.skip("the native kernel is not built here")
    monkeypatch.setattr(plan, "BRACKET", True)
    n = plan.HIST_BLOCK + plan.SAMPLE_PIECE
    gen = torch.Generator().manual_seed(17)
    base = (torch.randn(n, generator=gen) * 0.02).bfloat16()
    spread = torch.full((n,), 0.002)
    spread[-plan.SAMPLE_PIECE :] = 0.0024  # the last piece alone would put the bracket well above the threshold
    models = [(base.float() + torch.randn(n, generator=gen) * spread * (i + 1)).bfloat16() for i in range(3)]
    raw = [_raw(t) for t in [base, *models]]
    local = threading.local()  # one buffer per input and thread, as the engine's reader keeps them

    def read(i: int, s: int, e: int) -> memoryview:
        bufs = local.__dict__.setdefault("bufs", [bytearray(2 * n) for _ in raw])
        view = memoryview(bufs[i])[: 2 * (e - s)]
        view[:] = raw[i][2 * s : 2 * e]
        return view

    st = B.Stats(read, ["BF16"] * 4, True, n)
    taus = [t.float() - base.float() for t in models]
    var = torch.var(torch.stack(taus), dim=0, correction=0)
    k = int(int(torch.count_nonzero(var)) * 0.3)
    assert st.sce_selection(0.3) == (k, float(torch.topk(var, k).values[-1]))
    thr = float(torch.topk(var, k).values[-1])
    early = st._cache.get("sce_early")
    assert early is not None and early.covers(thr)
    _check_sce_bits_and_sums(st, thr, var, taus)


@pytest.mark.parametrize("layout", ["spread", "between-samples", "all-zero"])
@pytest.mark.parametrize("bracket", [True, False])
def test_sce_selection_counts_in_its_threshold_pass(monkeypatch, layout: str, bracket: bool) -> None:
    """SCE's rank k = int(select_topk · #{var ≠ 0}) and the k-th largest variance from one threshold pass that also
    counts (the bracket chosen for the sampled share; a share the sample misses costs one more pass), against torch:
    the population variance of the task vectors, count_nonzero, topk."""
    if not compute.native_available():
        pytest.skip("the native kernel is not built here")
    monkeypatch.setattr(plan, "BRACKET", bracket)
    n = (1 << 20) + 3000
    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(n, generator=gen) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(n, generator=gen) * 0.002).bfloat16() for _ in range(3)]
    same = torch.ones(n, dtype=torch.bool)  # where every model equals the base (variance 0)
    if layout == "spread":
        same = torch.rand(n, generator=gen) < 0.4
    elif layout == "between-samples":  # nonzero only between two of the sampled pieces: the sample sees none
        s = 5 * (n - plan.SAMPLE_PIECE) // (plan.SAMPLE_PIECES - 1) + plan.SAMPLE_PIECE + 100
        same[s : s + 10_000] = False
    models = [torch.where(same, base, t) for t in models]
    if layout == "spread":  # NaN variances: nonzero, and above every other value (as topk ranks them)
        models[1][range(1000, n, 997)] = float("nan")
    raw = [_raw(t) for t in [base, *models]]
    st = B.Stats(lambda i, s, e: raw[i][2 * s : 2 * e], ["BF16"] * 4, True, n)
    var = torch.var(torch.stack([t.float() - base.float() for t in models]), dim=0, correction=0)
    k = int(int(torch.count_nonzero(var)) * 0.3)
    want = float(torch.topk(var, k).values[-1]) if k else float("inf")
    assert st.sce_selection(0.3) == (k, want)
