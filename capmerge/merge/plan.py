"""Plan a merge: for every base tensor, the vectors that touch it, their pruning thresholds and the block kernel.

A *term* is one vector of the merge: a checkpoint holding τ, or a pair (A, S) meaning τ = A − S computed on the fly
(``capmerge apply P --add A --sub S``). Magnitude and breadcrumbs thresholds are exact k-th largest magnitudes, found
in linear time from a histogram of the |τ| bit patterns (one pass for 16-bit vectors and, mostly, for the float32
difference of two 16-bit inputs; two for other float32) while the engine's reader streams the tensor — no sort,
memory still flat.
"""

from __future__ import annotations

import functools
import math
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from capmerge.io.checkpoint import Checkpoint, TensorInfo
from capmerge.merge import compute
from capmerge.merge.engine import Job
from capmerge.merge.methods.base import MergeOptions, keep_count, tensor_key

Read = Callable[[int, int, int], memoryview]
HIST_BLOCK = 1 << 21
BRACKET: bool | None = None  # sampled bracket for long tensors: None = where the CPU has its vector loop, True = always
BRACKET_MIN = 1 << 20  # elements: shorter tensors are counted in full
SAMPLE_PIECES = 64  # the sample: this many pieces spread evenly over the tensor ...
SAMPLE_PIECE = 2048  # ... of this many elements each
BRACKET_SIGMAS = 6.0  # the bracket spans ranks k/n ± (BRACKET_SIGMAS standard errors + BRACKET_SLACK) ...
BRACKET_SLACK = 0.005  # ... as fractions of the tensor
THRESHOLD_PARALLEL_MIN = 2  # HIST_BLOCK blocks: a bracketed pass over as many runs on compute_threads() threads
COLLECT_MIN, COLLECT_SHARE = 1 << 14, 64  # a float32 bracket collects up to max(MIN, n / SHARE) inexact patterns


@dataclass
class Term:
    """One vector of a merge: ``a`` (τ itself) or ``a`` − ``b``; ``label`` names it in messages and records."""

    a: Checkpoint
    b: Checkpoint | None = None
    weight: float = 1.0
    label: str = ""


@dataclass
class MergeKernel:
    """The block kernel of one tensor: prune (thresholds from :meth:`prepare`), elect, combine, θ + α·δ per output.

    ``variants`` lists, per density variant, the densities of the terms; every density variant is written with
    every α of ``alphas``: output index = variant · len(alphas) + α index.
    """

    name: str
    base_code: str
    out_code: str
    terms: list[tuple[int, str, int | None, str, float]]  # (input a, code a, input b | None, code b, weight)
    options: MergeOptions
    variants: list[tuple[float, ...]]
    alphas: list[float]
    numel: int
    term_ids: list[int] = field(default_factory=list)  # the terms' indices in the whole merge (DARE streams)
    params: list[list[tuple[int, float, float, int]]] = field(default_factory=list)
    device: str = "cpu"  # a resolved device (capmerge.kernels.device.resolve_device): where the blocks are computed

    def __post_init__(self) -> None:
        o = self.options
        self.params = []
        for dens in self.variants:
            row = []
            for ti in range(len(self.terms)):
                d = dens[ti]
                key = tensor_key(o.seed, self.name, self.term_ids[ti] if self.term_ids else ti)
                if o.prune == "random" and d < 1.0:
                    row.append((compute.PRUNE_RANDOM, d, d if o.rescale else 0.0, key))
                elif o.prune in ("magnitude", "breadcrumbs") and (d < 1.0 or o.prune == "breadcrumbs"):
                    row.append((compute.PRUNE_MAGNITUDE, math.nan, math.nan, key))  # thresholds from prepare()
                else:
                    row.append((compute.PRUNE_NONE, 0.0, 0.0, key))
            self.params.append(row)

    @property
    def needs_prepare(self) -> bool:
        return any(math.isnan(p[1]) for row in self.params for p in row)

    def prepare(self, read: Read) -> None:
        """Exact thresholds: magnitude keeps |τ| ≥ v_k; breadcrumbs keeps v_lo ≤ |τ| < v_hi (see functional)."""
        n = self.numel
        for ti, (ia, ca, ib, cb, _) in enumerate(self.terms):
            wanted: dict[int, None] = {}
            plans = []
            for vi, dens in enumerate(self.variants):
                if not math.isnan(self.params[vi][ti][1]):
                    continue
                k = keep_count(dens[ti], n)
                if self.options.prune == "magnitude":
                    ks = (k, None)
                else:
                    top = min(math.floor(self.options.gamma * n + 0.5), n - k)
                    ks = (top + k, top if top > 0 else None)
                plans.append((vi, ks))
                for kk in ks:
                    if kk is not None:
                        wanted[kk] = None
            if not plans:
                continue
            values = kth_largest_abs_stream(read, ia, ca, ib, cb, n, sorted(wanted))
            for vi, (k_lo, k_hi) in plans:
                key = self.params[vi][ti][3]
                lo = values[k_lo]
                if self.options.prune == "magnitude":
                    self.params[vi][ti] = (compute.PRUNE_MAGNITUDE, lo, 0.0, key)
                else:
                    hi = values[k_hi] if k_hi is not None else math.inf
                    self.params[vi][ti] = (compute.PRUNE_BAND, lo, hi, key)

    def __call__(self, views: list[memoryview], outs: list[memoryview], n: int, offset: int) -> int:
        flags = 0
        na = len(self.alphas)
        o = self.options
        for vi, row in enumerate(self.params):
            terms = [
                (views[ia], ca, views[ib] if ib is not None else None, cb, w, mode, p1, p2, key)
                for (ia, ca, ib, cb, w), (mode, p1, p2, key) in zip(self.terms, row, strict=True)
            ]
            vouts = [(outs[vi * na + ai], self.out_code, a) for ai, a in enumerate(self.alphas)]
            kw = {"sign": o.sign, "normalize": o.normalize, "offset": offset}
            if self.device == "cpu":
                flags |= compute.merge_block(vouts, views[0], self.base_code, n, terms, **kw)
            else:  # the kernels' dispatch (it falls back to compute for what the kernels do not take)
                from capmerge.kernels.dispatch import merge_block

                flags |= merge_block(self.device, vouts, views[0], self.base_code, n, terms, **kw)
        return flags


def kth_largest_abs_stream(
    read: Read, ia: int, ca: str, ib: int | None, cb: str, n: int, ks: Sequence[int]
) -> dict[int, float]:
    """The k-th largest |τ| for each k in ``ks`` (τ = input ia, or ia − ib), exactly, streaming in blocks.

    Level 0 counts the top 15 bits of |τ| (the whole pattern of a 16-bit τ); a float32 τ then counts the low 16 bits
    within the bin found (level 1) — unless a bracketed level 0 kept every pattern inside its bracket whose low bits
    are not zero (:func:`_collected_kth`: a difference of two 16-bit models is mostly exact in 16 bits, so these are
    few), which settles the rank within the bin without a second pass. On CPUs with the vector loop
    (:data:`BRACKET`), a long tensor's level 0 first reads a sample (:data:`SAMPLE_PIECES` pieces spread over the
    tensor), brackets each threshold's bin from it (:func:`_bracket`), and then counts only the bins inside the
    bracket plus how many lie above it; should a threshold fall outside (an unrepresentative sample), the full count
    is made. Either way the result is exact."""
    return kth_largest_abs_many(read, [(ia, ca, ks)], ib, cb, n)[0]


def kth_largest_abs_tensor(t: Any, ks: Sequence[int]) -> dict[int, float]:
    """:func:`kth_largest_abs_stream` of a CPU tensor in memory (float32/bf16/fp16; 1 ≤ k ≤ numel): the value of
    ``capmerge.functional.kth_largest_abs`` (torch.topk, NaN largest) in linear time; other tensors go to that."""
    import torch

    code = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(t.dtype)
    if code is None or t.device.type != "cpu" or not compute.use_native(code) or t.numel() == 0:
        from capmerge import functional as F

        return {k: F.kth_largest_abs(t, k) for k in ks}
    flat = t.detach().reshape(-1).contiguous()
    view, size = memoryview(flat.view(torch.uint8).numpy()).cast("B"), t.element_size()
    return kth_largest_abs_stream(lambda i, s, e: view[size * s : size * e], 0, code, None, code, flat.numel(), ks)


def kth_largest_abs_many(
    read: Read,
    items: Sequence[tuple[int, str, Sequence[int]]],
    ib: int | None,
    cb: str,
    n: int,
    *,
    after_pass: Callable[[list[tuple[int, int]]], dict[int, list[int]]] | None = None,
    before_level1: Callable[[dict[int, dict[int, tuple[int, int]]], list[dict[int, float]]], None] | None = None,
    on_bracket: Callable[[int, float, float], None] | None = None,
) -> list[dict[int, float]]:
    """:func:`kth_largest_abs_stream` for several inputs (ia, ca, ks) against one ``ib``: their bracketed level-0
    passes run together, reading each block of ``ib`` once for all of them.

    ``after_pass``: ranks that the first full pass itself settles (e.g. a share of the entries it counts as nonzero,
    SCE's ``select_topk``): called with the pass's blocks once it has read every one, it returns j -> the ranks
    wanted, and ``items``' ks are then only the estimate the bracket is chosen for (a rank outside it costs one
    more pass). Native inputs only.

    ``before_level1(bins, values)``: called once, before the level-1 passes (one per input that needs it, in input
    order), with j -> {k: (level-0 bin, elements above it)} for the ranks they settle and ``values`` (the outputs so
    far: the ranks already known), so that a caller can do more work in their reads of its blocks (arcee_fusion's
    keep bits, from the threshold's bounds).

    ``on_bracket(j, lo, hi)``: called once the sample has chosen input j's bracket, before its pass over the whole
    (native inputs of at least BRACKET_MIN elements): every rank the bracket settles lies in [lo, hi) (float32
    values of |x|); a caller can then do the work of the values above and list those inside in its reads of the
    pass (SCE's keep bits and energies), and answer a float32 input's reads of that pass (each block once) with an
    :class:`Inside` where hi is finite: a pass answered so throughout settles its ranks from the listed values alone,
    without a histogram."""
    outs: list[dict[int, float]] = [{k: math.inf for k in ks if k <= 0} for _, _, ks in items]
    todo = [(j, ia, ca, sorted({k for k in ks if k > 0})) for j, (ia, ca, ks) in enumerate(items)]
    native = [t for t in todo if (t[3] or after_pass) and compute.use_native(t[2], *([cb] if ib is not None else []))]
    if after_pass is not None and len(native) < len(todo):
        raise ValueError("after_pass needs native inputs")
    for j, ia, ca, ks in (t for t in todo if t[3] and t not in native):
        outs[j].update(_kth_largest_torch(read, ia, ca, ib, cb, n, ks))
    todo = native
    settled = False

    def settle() -> list[tuple[int, int, str, list[int]]]:
        """``todo`` with the ranks after_pass gives (once the first full pass is done); an input left with no rank
        above 0 is answered in ``outs`` and leaves ``todo``."""
        nonlocal todo, settled
        if after_pass is not None and not settled:
            settled, final = True, after_pass(whole)
            for j, _, _, _ in todo:
                outs[j] = {k: math.inf for k in final[j] if k <= 0}
            ranks = {j: sorted({k for k in final[j] if k > 0}) for j, _, _, _ in todo}
            todo = [(j, ia, ca, ranks[j]) for j, ia, ca, _ in todo if ranks[j]]
        return todo

    if not todo:
        return outs
    import numpy as np

    from capmerge.merge.compute import _native

    assert _native is not None
    scratch = ThreadScratch()  # each thread's own, for the differences (the passes run on several)
    whole = [(s, min(n, s + HIST_BLOCK)) for s in range(0, n, HIST_BLOCK)]
    wide = {j: ib is not None or ca == "F32" for j, _, ca, _ in todo}
    dts = {j: compute.NATIVE_CODES["F32" if wide[j] else ca] for j, _, ca, _ in todo}

    def blocks(ia: int, ca: str, ranges: list[tuple[int, int]]):  # (buffer, n) of |τ| sources in the histogram's dtype
        for s, e in ranges:
            va = read(ia, s, e)
            if ib is None:
                yield va, e - s
            else:
                vb = read(ib, s, e)
                sv = scratch.get((e - s) * 4)
                compute.diff_block(sv, "F32", va, ca, vb, cb, e - s)
                yield sv, e - s

    def full_count(j: int, ia: int, ca: str) -> tuple[Any, int]:
        """Counts of every level-0 bin (nothing above)."""
        h = _Level0()
        for buf, cnt in blocks(ia, ca, whole):
            _native.hist0(buf, dts[j], cnt, h.sub_for(cnt))
        return h.counts(), 0

    found: dict[int, dict[int, tuple[int, int]] | None] = {j: None for j, _, _, _ in todo}
    if n >= BRACKET_MIN and (BRACKET is True or (BRACKET is None and _native.fast_bracket())):
        found = _bracketed(read, todo, ib, cb, n, whole, dts, wide, outs, settle, on_bracket)
    full = {j: full_count(j, ia, ca) for j, ia, ca, _ in todo if j in found and found[j] is None}
    level1 = []
    for j, ia, ca, ks in settle():
        if j in full:
            found[j] = _locate(*full[j], ks)
            assert found[j] is not None
        got = found.get(j)
        if got is None:  # settled by the bracketed pass
            continue
        if not wide[j]:
            for k, (b, _) in got.items():
                if ca == "BF16":
                    outs[j][k] = float32_of(b << 16)
                else:
                    outs[j][k] = float(np.array([b], dtype=np.uint16).view(np.float16)[0])
            continue
        level1.append((j, ia, ca, got))
    if level1 and before_level1 is not None:
        before_level1({j: got for j, _, _, got in level1}, outs)
    for j, ia, ca, got in level1:
        outs[j].update(_level1(functools.partial(blocks, ia, ca), whole, got))
    return outs


def _level1(blocks: Callable[[Iterable[tuple[int, int]]], Any], whole: list[tuple[int, int]],
            got: dict[int, tuple[int, int]]) -> dict[int, float]:  # fmt: skip
    """The k-th largest float32 values within their level-0 bins (``got``: k -> (bin, elements above it)): one pass
    that histograms the low 16 bits of every wanted bin from each block (``blocks(ranges)``: (buffer, n))."""
    import numpy as np

    from capmerge.merge.compute import _native

    assert _native is not None
    bins = sorted({b for b, _ in got.values()})
    wanted = np.array(bins, dtype=np.uint32)

    def level1(ranges: Iterable[tuple[int, int]]) -> Any:
        low = np.zeros((len(bins), 65536), dtype=np.uint64)
        for buf, cnt in blocks(ranges):  # each block read (or made) once, up to 16 bins counted per scan of it
            for c in range(0, len(bins), 16):
                _native.hist1(buf, cnt, wanted[c : c + 16], low[c : c + 16])
        return low

    lows = sum(_dealt(level1, whole))  # integer counts: any order, the same sum
    out = {}
    for row, b in enumerate(bins):
        ltop = np.cumsum(lows[row][::-1])
        for k, (bk, above) in got.items():
            if bk == b:
                i = int(np.searchsorted(ltop, k - above))
                bits = (b << 16) | (65535 - i)
                out[k] = float32_of(bits)
    return out


def _bracketed(read: Read, todo: list[tuple[int, int, str, list[int]]], ib: int | None, cb: str, n: int,
               whole: list[tuple[int, int]], dts: dict[int, int], wide: dict[int, bool],
               outs: list[dict[int, float]], settle: Callable[[], list[Any]] | None = None,
               on_bracket: Callable[[int, float, float], None] | None = None,
               ) -> dict[int, dict[int, tuple[int, int]] | None]:  # fmt: skip
    """The sampled bracket and one level-0 pass over the bracket for every input of ``todo`` (``ib`` read once per
    block, the difference made in the kernel). Returns j -> the bins found (a float32 τ still needs level 1), or
    None (a threshold outside the bracket: count in full); a j settled from the collected patterns is left out, its
    values written into ``outs[j]``. ``settle`` runs after the pass and gives ``todo`` with the final ranks (see
    ``after_pass`` of :func:`kth_largest_abs_many`)."""
    import numpy as np

    from capmerge.merge.compute import _native

    assert _native is not None
    brackets: dict[int, tuple[int, int]] = {}
    pieces = sample_pieces(n)
    joined = functools.cache(lambda i: _joined(read, i, pieces))  # the base's pieces read once for every input
    for j, ia, ca, ks in todo:
        sample = joined(ia)
        if ib is not None:  # the difference of every piece in one call
            m = len(pieces) * SAMPLE_PIECE
            sample, a = bytearray(4 * m), sample
            compute.diff_block(memoryview(sample), "F32", memoryview(a), ca, memoryview(joined(ib)), cb, m)
        brackets[j] = _bracket(sample, dts[j], n, ks)
        if on_bracket is not None:  # bins lo .. hi: |x| patterns from lo << 16 to below (hi + 1) << 16
            lo, hi = brackets[j]
            on_bracket(j, float32_of(lo << 16), float32_of((hi + 1) << 16) if hi + 1 <= 0x7F80 else math.inf)

    def count(ranges: Iterable[tuple[int, int]]) -> dict[int, list[Any]]:
        """The pass over ``ranges``: j -> [level-0 counts (0: none made), above, collected patterns, how many (-1:
        too many), the blocks read as an :class:`Inside`]. Every float32 bracket collects its inexact patterns: few
        for a difference of two 16-bit inputs (see above), and for other float32 values (SCE's variance,
        arcee_fusion's importance) as many as the bracket holds, often under the cap; past it, level 1 runs as
        before."""
        acc = {}  # j -> [level-0 histogram (made at its first block of values), above, collect, collected, Insides]
        for j, _, _, _ in todo:
            col = np.empty(max(COLLECT_MIN, n // COLLECT_SHARE) if wide[j] else 1, dtype=np.uint32)
            acc[j] = [None, 0, col, 0 if wide[j] else -1, []]
        for s, e in ranges:
            cnt = e - s
            vb = read(ib, s, e) if ib is not None else None
            for j, ia, ca, _ in todo:
                st, (lo, hi) = acc[j], brackets[j]
                va = read(ia, s, e)
                if isinstance(va, Inside):  # kept aside (see _inside_kth)
                    st[4].append(va)
                    continue
                st[0] = st[0] or _Level0()
                sub = st[0].sub_for(cnt)
                if vb is None and not wide[j]:
                    st[1] += _native.bracket(va, dts[j], cnt, lo, hi, sub, False)
                elif vb is None:
                    up, st[3] = _native.bracket(va, dts[j], cnt, lo, hi, sub, False, st[2], st[3])
                    st[1] += up
                else:
                    up, st[3] = _native.bracket_diff(va, compute.NATIVE_CODES[ca], vb, compute.NATIVE_CODES[cb], cnt,
                                                     lo, hi, sub, False, st[2], st[3])  # fmt: skip
                    st[1] += up
        return {j: [st[0].counts() if st[0] else 0, *st[1:]] for j, st in acc.items()}

    parts = _dealt(count, whole)
    if settle is not None:
        todo = settle()
    found: dict[int, dict[int, tuple[int, int]] | None] = {}
    for j, _, _, ks in todo:
        ps = [p[j] for p in parts]
        insides = [x for p in ps for x in p[4]]
        if len(insides) == len(whole):  # every block read as an Inside: its values alone settle the ranks
            direct = _inside_kth(insides, ks)
            if direct is None:
                found[j] = None
            else:
                outs[j].update(direct)
            continue
        if insides:
            ps.append(_insides_counted(insides, brackets[j], dts[j], n))
        ncol = -1 if any(p[3] < 0 for p in ps) else sum(p[3] for p in ps)
        col = np.concatenate([p[2][: p[3]] for p in ps]) if ncol >= 0 else None
        got = _locate(sum(p[0] for p in ps), sum(p[1] for p in ps), ks)
        if got is not None and ncol >= 0:
            outs[j].update(_collected_kth(col, got))
        else:
            found[j] = got
    return found


def _joined(read: Read, i: int, pieces: list[tuple[int, int]]) -> bytearray:
    """Input i's elements in ``pieces`` (the bracket's sample), joined: each copied at once (a read into a scratch
    buffer lasts until the next)."""
    out = bytearray()
    for s, e in pieces:
        out += read(i, s, e)
    return out


def _inside_kth(insides: list[Inside], ks: Sequence[int]) -> dict[int, float] | None:
    """The k-th largest |x| for each k of a pass read block by block as :class:`Inside`: the (k − above)-th largest
    of the values inside the bracket, without a histogram; None when some k lies outside it (above or below)."""
    import numpy as np

    above = sum(x.above for x in insides)
    vals = np.abs(np.concatenate([np.asarray(x.values, dtype=np.float32) for x in insides]))
    ranks = {k: k - above for k in ks}
    if any(r < 1 or r > len(vals) for r in ranks.values()):
        return None
    part = np.partition(vals, sorted({len(vals) - r for r in ranks.values()}))
    return {k: float(part[len(vals) - r]) for k, r in ranks.items()}


def _insides_counted(insides: list[Inside], bracket: tuple[int, int], dt: int, n: int) -> list[Any]:
    """Blocks read as :class:`Inside` (float32) as a part of the bracketed pass counts them: [level-0 counts, above,
    collected patterns, how many]. For a pass that read only some of its blocks so."""
    import numpy as np

    from capmerge.merge.compute import _native

    assert _native is not None
    h, above, ncol = _Level0(), 0, 0
    col = np.empty(max(COLLECT_MIN, n // COLLECT_SHARE), dtype=np.uint32)
    for x in insides:
        up, ncol = _native.bracket(x.values, dt, len(x.values), *bracket, h.sub_for(len(x.values)), False, col, ncol)
        above += up + x.above
    return [h.counts(), above, col, ncol]


def _collected_kth(col: Any, found: dict[int, tuple[int, int]]) -> dict[int, float]:
    """The k-th largest from level 0 alone: within bin b, the collected inexact patterns rank first (their low 16
    bits are non-zero) and every other element of the bin is the pattern b << 16 itself."""
    import numpy as np

    out = {}
    for k, (b, above) in found.items():
        inside = np.sort(col[(col >> 16) == b])[::-1]
        r = k - above  # 1-based rank inside the bin
        bits = int(inside[r - 1]) if r <= len(inside) else b << 16
        out[k] = float32_of(bits)
    return out


def sample_pieces(n: int) -> list[tuple[int, int]]:
    """The element ranges of a bracket's sample: SAMPLE_PIECES pieces of SAMPLE_PIECE spread evenly over ``n``
    (n ≥ SAMPLE_PIECES · SAMPLE_PIECE)."""
    starts = [i * (n - SAMPLE_PIECE) // (SAMPLE_PIECES - 1) for i in range(SAMPLE_PIECES)]
    return [(s, s + SAMPLE_PIECE) for s in starts]


def _bracket(sample: bytearray, dt: int, n: int, ks: Sequence[int]) -> tuple[int, int]:
    """Level-0 bins [lo, hi] that hold, in the sample, the ranks k/n ± (BRACKET_SIGMAS standard errors + BRACKET_SLACK)
    of every k. The standard error comes from how much the pieces disagree (cluster sampling): the fraction of each
    piece above the sample's own threshold bin varies little for entries of one spread, a lot when rows differ in
    scale — and the bracket widens with it."""
    import numpy as np

    from capmerge.merge.compute import _native

    assert _native is not None
    m = SAMPLE_PIECES * SAMPLE_PIECE
    sub = np.zeros(4 * 32768, dtype=np.uint32)
    _native.hist0(sample, dt, m, sub)
    top = np.cumsum(_fold(sub)[::-1])  # top[i]: sample entries in bins >= 32767 - i
    view = memoryview(sample)
    step = len(sample) // SAMPLE_PIECES
    lo, hi = 32767, 0
    for k in ks:
        r = k * m / n
        b = 32767 - int(np.searchsorted(top, max(r, 1.0)))
        # each piece's fraction above bin b (sub, already summed into top, takes the uncounted bin b as scratch)
        above = np.array([_native.bracket(view[j * step : (j + 1) * step], dt, SAMPLE_PIECE, b, b, sub, False)
                          for j in range(SAMPLE_PIECES)]) / SAMPLE_PIECE  # fmt: skip
        d = (BRACKET_SIGMAS * float(above.std()) / math.sqrt(SAMPLE_PIECES) + BRACKET_SLACK) * m
        hi = max(hi, 32767 if r - d < 1 else 32767 - int(np.searchsorted(top, r - d)))
        lo = min(lo, 0 if r + d > m else 32767 - int(np.searchsorted(top, r + d)))
    return lo, max(lo, hi)


def _dealt(fn: Callable[[Iterable[tuple[int, int]]], Any], whole: list[tuple[int, int]]) -> list[Any]:
    """``fn`` over the blocks ``whole``, one call per compute thread, each thread taking the next block not yet taken
    as it goes (a thread done early takes more, where blocks dealt out in turn left it waiting for the other's last
    one); the results in thread order. Which thread reads which block depends on timing: callers combine the results
    so that it does not matter (sums of counts, values sorted or partitioned afterwards)."""
    from capmerge.merge.engine import compute_threads, parallel_map

    workers = min(compute_threads(), len(whole)) if len(whole) >= THRESHOLD_PARALLEL_MIN else 1
    if workers <= 1:
        return [fn(whole)]
    lock, pending = threading.Lock(), iter(whole)

    def taken() -> Iterator[tuple[int, int]]:
        while True:
            with lock:
                r = next(pending, None)
            if r is None:
                return
            yield r

    return parallel_map(fn, [taken() for _ in range(workers)])


@dataclass(frozen=True)
class Inside:
    """What a read may give for a block of the bracketed pass in place of its float32 values, once ``on_bracket``
    has told the reader the bracket [lo, hi) (see :func:`kth_largest_abs_many`): ``above``, the count of values whose
    |x| bit pattern is at least hi's (x ≥ hi and NaN: the level-0 bins above the bracket), and ``values``, the values
    inside the bracket in block order; the block's other values lie below it."""

    above: int
    values: Any  # float32


class ThreadScratch:
    """A buffer per thread, grown on demand: the scratch of passes whose blocks run on several threads (the same
    threads from pass to pass, :func:`~capmerge.merge.engine.parallel_map`, so a tensor's passes make them once rather
    than once per pass and thread); a thread that ends gives its buffer back for the threads after it."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._free: list[Any] = []

    def get(self, nbytes: int) -> memoryview:
        """``nbytes`` of this thread's buffer (its contents are whatever was last left there: callers write first)."""
        held = getattr(self._local, "held", None)
        if held is None or len(held.buf) < nbytes:
            import numpy as np

            try:
                buf = self._free.pop()
            except IndexError:
                buf = None
            if buf is None or len(buf) < nbytes:
                buf = np.empty(nbytes, dtype=np.uint8)  # not zeroed: nothing reads what it has not written
            held = self._local.held = _Held(buf, self._free)
        return memoryview(held.buf)[:nbytes]


class _Held:
    """A thread's scratch buffer; given back to ``free`` when the thread ends (and drops its thread-local values)."""

    def __init__(self, buf: Any, free: list[Any]) -> None:
        self.buf, self._free = buf, free

    def __del__(self) -> None:
        self._free.append(self.buf)


class _Level0:
    """Level-0 bin counts: four interleaved uint32 sub-histograms for the kernels (runs of equal bins do not
    serialise on one counter), folded into int64 counts before any counter could overflow."""

    def __init__(self) -> None:
        import numpy as np

        self.sub = np.zeros(4 * 32768, dtype=np.uint32)
        self.total = np.zeros(32768, dtype=np.int64)
        self.since = 0

    def sub_for(self, cnt: int) -> Any:
        """The sub-histograms, with room for ``cnt`` more elements."""
        if self.since + cnt >= 1 << 32:
            self.total += _fold(self.sub)
            self.sub[:] = 0
            self.since = 0
        self.since += cnt
        return self.sub

    def counts(self) -> Any:
        return self.total + _fold(self.sub)


def _fold(sub: Any) -> Any:
    """The four interleaved uint32 sub-histograms of hist0/bracket summed into one int64 count per bin."""
    import numpy as np

    return sub.reshape(4, 32768).sum(0, dtype=np.int64)


def _locate(counts: Any, above: int, ks: Sequence[int]) -> dict[int, tuple[int, int]] | None:
    """k -> (the bin of the k-th largest, elements above that bin); None if some k lies outside the counted bins."""
    import numpy as np

    top = above + np.cumsum(counts[::-1])  # top[i] = elements in bins >= 32767 - i (or above the bracket)
    found = {}
    for k in ks:
        if k <= above or k > int(top[-1]):
            return None
        i = int(np.searchsorted(top, k))
        found[k] = (32767 - i, int(top[i - 1]) if i else above)
    return found


def float32_of(bits: int) -> float:
    """The float32 value of a 32-bit pattern (a level-0 bin b is the patterns b << 16 .. (b << 16) | 0xFFFF)."""
    return float(struct.unpack("<f", struct.pack("<I", bits))[0])


def _kth_largest_torch(
    read: Read, ia: int, ca: str, ib: int | None, cb: str, n: int, ks: Sequence[int]
) -> dict[int, float]:
    """Fallback for dtypes the native kernel does not handle: the whole tensor in memory, ``torch.topk``."""
    import torch

    from capmerge._torch import as_tensor

    a = torch.cat([as_tensor(bytearray(read(ia, s, min(n, s + HIST_BLOCK))), ca).double()
                   for s in range(0, n, HIST_BLOCK)])  # fmt: skip
    if ib is not None:
        a = a - torch.cat([as_tensor(bytearray(read(ib, s, min(n, s + HIST_BLOCK))), cb).double()
                           for s in range(0, n, HIST_BLOCK)])  # fmt: skip
    vals = torch.topk(a.float().abs(), max(ks), sorted=True).values
    return {k: float(vals[k - 1]) for k in ks}


def merge_job(
    name: str,
    base: tuple[Checkpoint, TensorInfo],
    touching: list[tuple[int, Term, TensorInfo, TensorInfo | None]],
    *,
    out_code: str,
    options: MergeOptions,
    variants: list[tuple[float, ...]],
    alphas: list[float],
    sink: int,
    device: str = "cpu",
    weights: Sequence[float] | None = None,
) -> Job:
    """A compute job for one base tensor; ``touching`` = (term index, term, info of a, info of b).

    ``variants`` hold one density per term of the whole merge; ``weights`` (one per term of the whole merge, default
    each term's own) are this tensor's, e.g. from a per-tensor override."""
    inputs: list[tuple[Checkpoint, TensorInfo]] = [base]
    specs = []
    for ti, term, ia, ib in touching:
        inputs.append((term.a, ia))
        a_idx = len(inputs) - 1
        b_idx = None
        if term.b is not None and ib is not None:
            inputs.append((term.b, ib))
            b_idx = len(inputs) - 1
        w = term.weight if weights is None else float(weights[ti])
        specs.append((a_idx, ia.dtype, b_idx, ib.dtype if ib is not None else "F32", w))
    sub_variants = [tuple(v[ti] for ti, _, _, _ in touching) for v in variants]
    ids = [ti for ti, _, _, _ in touching]
    kernel = MergeKernel(name, base[1].dtype, out_code, specs, options, sub_variants, alphas, base[1].numel, ids,
                         device=device)  # fmt: skip
    return Job(
        name,
        "compute",
        out_code,
        base[1].shape,
        inputs,
        kernel=kernel,
        prepare=kernel.prepare if kernel.needs_prepare else None,
        sink=sink,
    )
