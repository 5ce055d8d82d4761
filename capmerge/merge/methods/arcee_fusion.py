"""Arcee Fusion, model-centric (mergekit's ``arcee_fusion``): take the other model's changes only where they matter.

For base θ₀ and model θ₁: importance I = |θ₁ − θ₀|·KL, KL = Σ p·log(p/q) over the last dimension with
p = softmax(θ₁) + 1e-8, q = softmax(θ₀) + 1e-8 (a 1-D tensor is one row); with Q(x) the element of rank
⌊x·(n − 1)⌋ (0-based) of the sorted I, the threshold is Q(½) + 1.5·(Q(¾) − Q(¼)) and
out = θ₀ + (θ₁ − θ₀)·[I ≥ threshold] (a dropped change is 0 even where it is NaN or inf, as in every pruning method
here; mergekit multiplies by the mask, NaN·0 = NaN).
In float32; the rows' KL natively from their moments (one exp and no log per entry; see :func:`_kl_rows`), within
1e-6 of a float64 evaluation on rows of a finetune, where float32 arithmetic is off by several percent. The
quantiles are exact for every size (a linear-time selection, no sort); mergekit estimates them from a random sample
of 10⁶ entries (with replacement) once a tensor has more, so for such tensors its threshold — and output — varies
from run to run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from capmerge.merge import compute, plan
from capmerge.merge.methods import blockform as B
from capmerge.merge.methods.models import ModelMethod, TensorInputs
from capmerge.merge.plan import float32_of

if TYPE_CHECKING:
    import torch


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ₀| times the row's KL divergence between the softmaxes of θ₁ and θ₀ (see the module's docstring)."""
    kl = row_kl(model, base)
    return (model - base).abs() * (kl.unsqueeze(-1) if model.dim() else kl)  # a 0-d tensor is its own row


def ranked(flat: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """The elements of 0-based ranks ``ranks`` of ``flat`` sorted ascending (float32, exact): from the native
    histogram selection when every entry is ≥ 0 (then |x| orders as x), else torch.kthvalue; no sort either way."""
    import torch

    n = flat.numel()
    if n and bool(flat.min() >= 0):
        from capmerge.merge.plan import kth_largest_abs_tensor

        got = kth_largest_abs_tensor(flat, [n - r for r in ranks])
        return torch.tensor([got[n - r] for r in ranks], dtype=torch.float32)
    return torch.stack([torch.kthvalue(flat, r + 1).values for r in ranks])


def _arcee_fusion(x: TensorInputs) -> torch.Tensor:
    import torch

    if x.base is None or len(x.models) != 1:
        raise ValueError(f"tensor {x.name}: arcee_fusion takes a base model and exactly one other model")
    base, model = x.base.float(), x.models[0].float()
    scores = importance(model, base)
    if scores.numel() == 0:
        return base
    q1, median, q3 = ranked(scores.reshape(-1), [int(q * (scores.numel() - 1)) for q in (0.25, 0.5, 0.75)])
    keep = scores >= median + 1.5 * (q3 - q1)
    return base + torch.where(keep, model - base, 0.0)  # a dropped change is 0, even one that is not finite


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(θ₁) + 1e-8 ‖ softmax(θ₀) + 1e-8) of each row (the last dimension), as :func:`importance` takes it
    (float32): the native ``row_kl`` for CPU tensors (from the rows' moments; see :func:`_kl_rows`), else torch's
    operations in float64 on the tensors' device. Both are within 1e-6 of the exact value where float32 operations
    (mergekit's) are off by up to a fifth on rows of a finetune, so a GPU and a CPU keep the same changes but for
    the rare entry at the threshold."""
    import torch

    m = model.shape[-1] if model.dim() else 1
    if compute.native_available() and model.numel() and model.device.type == base.device.type == "cpu":
        from capmerge.merge.compute import _native

        a, b = (t.detach().float().contiguous().reshape(-1, m) for t in (model, base))
        out = torch.empty(a.shape[0])
        _native.row_kl(a.numpy(), 0, b.numpy(), 0, a.shape[0], m, out.numpy())
        return out.reshape(model.shape[:-1])
    p = torch.softmax(model.double(), dim=-1).add_(1e-8)
    q = torch.softmax(base.double(), dim=-1).add_(1e-8)
    q = torch.div(p, q, out=q).log_().mul_(p)  # in place: p·log(p/q), without new buffers
    return torch.sum(q, dim=-1).float()


def _form(s: B.Spec) -> B.Finish | None:
    """The block form: where a sample brackets the quartiles, one pass makes the rows' KL, the quartiles and the keep
    bits (:func:`_scanned`). Else the rows' KL from blocks of whole rows (native, float32, one number per row kept);
    the three quantiles of I = |θ₁ − θ₀|·KL_row by an exact threshold pass over I made block by block (native
    ``importance``, never stored whole; a KL that rounds below 0 puts its row's I below 0, ranked first by magnitude
    as in the sorted order); a pass for the keep bits of I ≥ threshold. The kernel adds the kept changes to θ₀.
    Without the native kernel, a tensor of no dimension or an empty one: ``fn``'s torch code (the runner gives the
    form float32/16/bf16 inputs only, and ``fn`` gives it float32)."""
    if not s.has_base or s.n_models != 1 or not s.shape or s.numel == 0 or not compute.native_available():
        return None
    m, n = s.shape[-1], s.numel

    def finish(st: B.Stats) -> B.Combo:
        from capmerge.merge.compute import _native
        from capmerge.merge.plan import ThreadScratch, kth_largest_abs_many

        codes = [compute.NATIVE_CODES[c] for c in st.codes]
        bits = np.zeros((n + 7) // 8, dtype=np.uint8)
        ranks = [int(q * (n - 1)) for q in (0.25, 0.5, 0.75)]
        scanned = _scanned(st, m, ranks, bits) if FUSED else None
        # z: how many entries of I are below 0 (they rank first, by their magnitude)
        kl, z = (scanned.kl, scanned.below) if scanned is not None else _kl_rows(st, m)
        klb = memoryview(kl).cast("B")

        def bits_pass(thr: float) -> B.Combo:
            def block(a: int) -> None:
                e = min(n, a + B.STAT_BLOCK)
                _native.importance(st.read(1, a, e), codes[1], st.read(0, a, e), codes[0], e - a, a, m, klb, thr,
                                   None, bits)  # fmt: skip

            B.map_blocks(block, range(0, n, B.STAT_BLOCK))
            return combo

        combo = B.Combo([B.Term(0, 1.0, (B.BITS, 0.0, 0.0, 0), bits)], relative=True, with_base=True)
        if scanned is not None and scanned.thr is not None:  # the quartiles from the KL's own pass
            return combo if scanned.bits_made else bits_pass(scanned.thr)
        scratch = ThreadScratch()
        band = _Band()

        def importance_of(i: int, a: int, e: int) -> memoryview:
            """The threshold pass's virtual inputs: 0 = max(I, 0), 1 = −min(I, 0) (I itself when nothing is < 0);
            the first level-1 pass also sets the keep bits the threshold's bounds decide (see _Band)."""
            out = scratch.get(4 * (e - a))
            args = (st.read(1, a, e), codes[1], st.read(0, a, e), codes[0], e - a, a, m, klb)
            if band.bounds is None or i != band.input:
                _native.importance(*args, 0.0, out, None, i + 1)
                return out
            lo, hi = band.bounds
            cap = max(BAND_MIN, (e - a) // BAND_SHARE)
            idx, val = np.empty(cap, dtype=np.uint64), np.empty(cap, dtype=np.float32)
            _, count = _native.importance(*args, hi, out, bits, i + 1, lo, idx, val)
            band.add(e - a, idx[:count], val[:count], count <= cap)
            return out

        quartiles = [(0, n - r) if r >= z else (1, r + 1) for r in ranks]  # (input, k) of Q(¼), Q(½), Q(¾)

        def before_level1(found: dict[int, dict[int, tuple[int, int]]], known: list[dict[int, float]]) -> None:
            band.input = min(found)  # the first level-1 pass (inputs in order) reads every block once
            band.bounds = _threshold_bounds(quartiles, found, known)

        items = [(0, "F32", [n - r for r in ranks if r >= z]), (1, "F32", [r + 1 for r in ranks if r < z])]
        top, low = kth_largest_abs_many(importance_of, items, None, "F32", n, before_level1=before_level1)
        q1, median, q3 = (np.float32(top[n - r] if r >= z else -low[r + 1]) for r in ranks)
        thr = float(median + np.float32(1.5) * (q3 - q1))
        if not band.settles(n, thr):
            return bits_pass(thr)
        _set_bits(bits, band.kept(np.float32(thr)))
        return combo

    return finish


BAND_MIN, BAND_SHARE = 1 << 12, 16  # a level-1 block lists up to max(MIN, its entries / SHARE) undecided entries


class _Band:
    """The keep bits made in the level-1 pass of the threshold's quantiles, before the threshold is known: its
    level-0 bins bound each quartile, so the threshold Q(½) + 1.5·(Q(¾) − Q(¼)) lies in [lo, hi] (the same float32
    operations on the bounds: each is monotone). Entries with I ≥ hi are kept whatever the threshold, those below lo
    dropped; the few between are listed (index, I) and decided once it is known. Should a block list more than its
    room, the bits are made by a pass of their own as before."""

    def __init__(self) -> None:
        self.bounds: tuple[float, float] | None = None
        self.input = 0  # the virtual input whose level-1 pass makes the bits
        self.parts: list[tuple[int, Any, Any, bool]] = []  # (entries read, indices, values, all listed)

    def add(self, count: int, idx: Any, val: Any, complete: bool) -> None:
        self.parts.append((count, idx.copy(), val.copy(), complete))  # list.append: safe from the pass's threads

    def settles(self, n: int, thr: float) -> bool:
        """Whether the level-1 pass read all ``n`` entries with room for every undecided one, thr within bounds."""
        return (self.bounds is not None and sum(p[0] for p in self.parts) == n and all(p[3] for p in self.parts)
                and self.bounds[0] <= thr <= self.bounds[1])  # fmt: skip

    def kept(self, thr: Any) -> Any:
        """The listed entries with I ≥ thr (float32, as importance()'s bits compare)."""
        idx = np.concatenate([p[1] for p in self.parts])
        return idx[np.concatenate([p[2] for p in self.parts]) >= thr]


def _threshold_bounds(quartiles: list[tuple[int, int]], bins: dict[int, dict[int, tuple[int, int]]],
                      known: list[dict[int, float]]) -> tuple[float, float] | None:  # fmt: skip
    """[lo, hi] holding the threshold Q(½) + 1.5·(Q(¾) − Q(¼)) from the quartiles' values where known, else their
    level-0 bins' ranges (``quartiles``: (input, k) of Q(¼), Q(½), Q(¾): the k-th largest of input 0, I ≥ 0, or of
    input 1, the magnitudes of I < 0); None if a bound is not finite."""
    lows, highs = [], []
    for j, k in quartiles:
        if k in known[j]:
            lo = hi = np.float32(known[j][k])
        else:
            b = bins[j][k][0]
            lo, hi = np.float32(float32_of(b << 16)), np.float32(float32_of((b << 16) | 0xFFFF))
        lows.append(lo if j == 0 else -hi)
        highs.append(hi if j == 0 else -lo)
    lo = lows[1] + np.float32(1.5) * (lows[2] - highs[0])
    hi = highs[1] + np.float32(1.5) * (highs[2] - lows[0])
    return (float(lo), float(hi)) if np.isfinite(lo) and np.isfinite(hi) else None


FUSED = True  # the quartiles and the keep bits from the rows' KL pass where a sample brackets them (_scanned)
SCAN_SAMPLE, SCAN_ROWS = 1 << 18, 128  # the sample: whole rows spread evenly, this many entries and rows at least,
SCAN_SHARE = 32  # ... and a SHARE-th of the rows (the more rows, the narrower the brackets)
SCAN_RUNS = 32  # ... in this many runs of neighbouring rows (read together)
SCAN_VALUES = 1 << 18  # ... of which this many at most are ranked, and a SHARE-th of the tensor's entries at most
SCAN_SIGMAS, SCAN_SLACK = 3.0, 0.0005  # a bracket spans ranks r/n ± (SIGMAS standard errors + SLACK)
LIST_SHARE = 4  # a block of the fused pass lists up to its entries / SHARE values inside the brackets
SCAN_WIDEST = 0.15  # brackets spanning more of the sample's ranks together: no fused pass (the passes of before)


class _Scanned(NamedTuple):
    """:func:`_scanned`'s result: the rows' KL, how many I < 0, the threshold (None: the quartiles not settled) and
    whether ``bits`` holds the keep bits."""

    kl: Any
    below: int
    thr: float | None
    bits_made: bool


def _scanned(st: B.Stats, m: int, ranks: list[int], bits: Any) -> _Scanned | None:
    """The quartiles Q(¼), Q(½), Q(¾) of I = |θ₁ − θ₀|·KL_row and the keep bits of I ≥ threshold in the pass that
    makes the rows' KL (native ``row_kl_scan``: each row's I scanned while the row is in cache), where
    :func:`_kl_rows` and two passes of the threshold selection over both inputs did it before.

    A sample of whole rows (at least SCAN_SAMPLE entries, SCAN_ROWS rows and a SCAN_SHARE-th of the rows, in
    SCAN_RUNS runs spread evenly; their KL and I made alone; at most SCAN_VALUES of their values ranked) brackets
    each quartile: ranks r/n ± (SCAN_SIGMAS standard errors + SCAN_SLACK) of the sample, the standard error from how
    much the rows disagree. The pass counts the I below each bracket and lists those inside any (a few per cent of
    the entries); a quartile whose rank falls among its listed values is the value of that rank among them (exact,
    as the sorted order: no estimate). A miss costs time only: the passes of before.

    From the brackets' bounds the threshold Q(½) + 1.5·(Q(¾) − Q(¼)) lies in [lo, hi] (the same float32 operations
    on the bounds: each is monotone), so the pass also sets the bits of I ≥ hi and lists the entries between,
    decided once the threshold is known, as the level-1 pass's band does (:class:`_Band`).

    Returns the KL with the threshold and the bits made; or with the threshold only (a band with no room, or
    unbounded: the bits by a pass of their own); or with no threshold — a NaN, a quartile outside its bracket or
    values with no room —, ``bits`` cleared and the KL kept for the passes of before. None (nothing made but the
    sample's) for rows not a multiple of 8 long (the bits of a row are whole bytes), a tensor under plan's
    BRACKET_MIN entries or of fewer than eight samples' rows, a sample holding NaN, or brackets wider than
    SCAN_WIDEST together."""
    from capmerge.merge.compute import _native
    from capmerge.merge.plan import ThreadScratch

    n = st.numel
    rows = n // m
    count = max(SCAN_ROWS, -(-SCAN_SAMPLE // m), rows // SCAN_SHARE)
    if m % 8 or n < plan.BRACKET_MIN or rows < 8 * count:
        return None
    codes = [compute.NATIVE_CODES[c] for c in st.codes]
    run = -(-count // SCAN_RUNS)  # rows read together
    count = run * SCAN_RUNS
    sample = np.empty((count, m), dtype=np.float32)
    kl = np.empty(run, dtype=np.float32)
    for i in range(SCAN_RUNS):
        r = i * (rows - run) // (SCAN_RUNS - 1)
        a, b = st.read(1, r * m, (r + run) * m), st.read(0, r * m, (r + run) * m)
        _native.row_kl(a, codes[1], b, codes[0], run, m, kl)
        _native.importance(a, codes[1], b, codes[0], run * m, 0, m, kl, 0.0, sample[i * run : (i + 1) * run], None, 0)
    if np.isnan(sample).any():
        return None
    sample = sample[:, :: max(1, count * m // min(SCAN_VALUES, n // SCAN_SHARE))]  # the values ranked: columns
    size = sample.size  # evenly spaced in every row
    fs, flat = [r / (n - 1) for r in ranks], sample.reshape(-1)
    ends = []  # each quartile's bracket: sample ranks from lo_i to hi_i
    for f, t in zip(fs, _select(flat, [round(f * (size - 1)) for f in fs]), strict=True):
        below = np.count_nonzero(sample < t, axis=1) / sample.shape[1]  # each row's share below t
        d = SCAN_SIGMAS * float(below.std()) / math.sqrt(count) + SCAN_SLACK
        ends.append((math.floor((f - d) * (size - 1)), math.ceil((f + d) * (size - 1))))
    if sum(hi - lo for lo, hi in ends) > SCAN_WIDEST * size:  # rows that disagree a lot: too many to list
        return None
    inner = sorted({i for pair in ends for i in pair if 0 <= i < size})
    flat = dict(zip(inner, _select(flat, inner), strict=True))
    up, big = np.float32(np.inf), math.inf
    brackets = [(float(flat[lo]) if lo >= 0 else -big, float(np.nextafter(flat[hi], up)) if hi < size else big)
                for lo, hi in ends]  # fmt: skip
    f32 = np.float32
    (l1, h1), (l2, h2), (l3, h3) = ((f32(lo), f32(hi)) for lo, hi in brackets)
    with np.errstate(over="ignore", invalid="ignore"):
        blo, bhi = l2 + f32(1.5) * (l3 - h1), h2 + f32(1.5) * (h3 - l1)
    banded = bool(np.isfinite(blo) and np.isfinite(bhi))
    kl = np.empty(rows, dtype=np.float32)
    step = max(1, KL_BLOCK // m)
    scratch = ThreadScratch()
    band = (float(blo), float(bhi)) if banded else (0.0, 0.0)

    def block(r0: int) -> tuple[Any, ...]:
        r1 = min(rows, r0 + step)
        s, e = r0 * m, r1 * m
        room, cap = (e - s) // LIST_SHARE + 16, (max(BAND_MIN, (e - s) // BAND_SHARE) + 16) * banded
        buf = np.frombuffer(scratch.get(4 * room + 12 * cap), dtype=np.uint8)
        col, band_at = buf[: 4 * room].view(np.float32), 4 * room + 8 * cap
        idx, val = buf[4 * room : band_at].view(np.uint64), buf[band_at:].view(np.float32)
        z, nan, below, got, nb = _native.row_kl_scan(st.read(1, s, e), codes[1], st.read(0, s, e), codes[0], r1 - r0,
                                                     m, kl[r0:r1], s, brackets, col, bits if banded else None, band,
                                                     idx, val)  # fmt: skip
        return z, nan, below, col[:got].copy() if got >= 0 else None, idx[:nb].copy(), val[:nb].copy(), nb <= cap

    parts = B.map_blocks(block, range(0, rows, step))
    z = sum(p[0] for p in parts)
    if any(p[1] or p[3] is None for p in parts):  # a NaN, or values with no room
        bits.fill(0)
        return _Scanned(kl, z, None, False)
    listed = np.concatenate([p[3] for p in parts])
    # the k-th value inside bracket q: the (listed below its lo + k)-th of the list, once k is inside it
    at = []
    for q, (r, (lo, hi)) in enumerate(zip(ranks, brackets, strict=True)):
        k, before = r - sum(p[2][q] for p in parts), int(np.count_nonzero(listed < f32(lo)))
        if not 0 <= k < int(np.count_nonzero(listed < f32(hi))) - before:
            bits.fill(0)
            return _Scanned(kl, z, None, False)
        at.append(before + k)
    values = _select(listed, at)
    q1, median, q3 = values
    thr = median + f32(1.5) * (q3 - q1)
    if banded and all(p[6] for p in parts) and blo <= thr <= bhi:
        idx, val = np.concatenate([p[4] for p in parts]), np.concatenate([p[5] for p in parts])
        _set_bits(bits, idx[val >= thr])
        return _Scanned(kl, z, float(thr), True)
    bits.fill(0)
    return _Scanned(kl, z, float(thr), False)  # the bits by a pass of their own


def _set_bits(bits: Any, kept: Any) -> None:
    """Set the keep bits of the entries ``kept`` (uint64 indices; element i at bits[i // 8], bit i % 8)."""
    np.bitwise_or.at(bits, kept >> 3, np.left_shift(1, kept & 7).astype(np.uint8))


def _select(values: Any, ranks: list[int]) -> list[Any]:
    """The elements of 0-based ranks ``ranks`` of the float32 array ``values`` (no NaN) sorted ascending: by the
    native ``select`` where every value is ≥ 0 (then their bit patterns order as they do; linear in the size whatever
    the ties, in one call; it finds a value below 0 itself), else numpy's partition, one rank a call."""
    from capmerge.merge.compute import _native

    got = _native.select(np.ascontiguousarray(values), ranks) if len(values) else None
    if got is not None:
        return [np.float32(v) for v in got]
    return [np.partition(values, r)[r] for r in ranks]


KL_BLOCK = 1 << 18  # entries per block of the rows' KL (whole rows)


def _kl_rows(st: B.Stats, m: int) -> tuple[np.ndarray, int]:
    """:func:`row_kl` of every row, from blocks of whole rows on the compute threads (native ``row_kl``: float32,
    one per row), and how many entries of I are below 0 (in the rows whose KL rounded below 0: I = |θ₁ − θ₀|·KL,
    the same float32 product as ``importance``).

    The native KL takes exp from Cephes' float polynomial and a row's sums in a fixed order (float64; float32 over
    blocks of 256 entries first where one exp per entry), the same bits with AVX-512, AVX2 and in plain C: a row's
    value never depends on the split, the thread count or the CPU.
    It comes from the row's moments: with d = θ₁ − θ₀, p = softmax(θ₁) and Δ = LSE(θ₁) − LSE(θ₀) = −log E_p[e^(−d)],
    log(p/q) = d − Δ, so KL = E_p[d] + log E_p[e^(−d)], and mergekit's 1e-8 adds −1e-8/2·Σ(d − Δ)² to first order;
    two passes, no log or division per entry. Where max|d| ≤ ½ (any finetune), E_p[e^(−d)] = 1 − E_p[d] + E_p[g]
    with g = e^(−d) − 1 + d from a float polynomial in d: one exp per entry (e^(θ₁−max)), and no cancellation of two
    rounded sums. Else Δ from the two rows' sums of exps (d exact in float64). A row where the 1e-8 is not small next
    to every p and q (the left-out terms' bound above 2⁻¹⁰ of the KL), or that holds a NaN or an inf, takes a third
    pass of p·log(p/q) (Cephes' log). On rows like a finetune's (weights ~0.02, changes ~1e-3, KL ~5e-7) it is within
    1e-7 of a float64 reference on rows up to 5632 long, 5e-7 on rows of 65536 (the 1e-8 to first order leaves that;
    the two exps' sums: within 0.3 % on rows of 2048; 1/Σexp rounded to float32 moved the three passes' KL before
    them by up to 20 %; torch's float32 operations as much)."""
    from capmerge.merge.compute import _native

    rows = st.numel // m
    step = max(1, KL_BLOCK // m)
    kl = np.empty(rows, dtype=np.float32)
    codes = [compute.NATIVE_CODES[c] for c in st.codes]

    def block(r0: int) -> int:
        r1 = min(rows, r0 + step)
        a, e = r0 * m, r1 * m
        return int(_native.row_kl(st.read(1, a, e), codes[1], st.read(0, a, e), codes[0], r1 - r0, m, kl[r0:r1]))

    return kl, sum(B.map_blocks(block, range(0, rows, step)))


MODEL_METHODS = (
    ModelMethod("arcee_fusion", B.with_form(_form, _arcee_fusion), base="required", n_models=(1, 1), form=_form,
                summary="the other model's changes where their importance (change × KL) is an upper outlier"),
)  # fmt: skip
