"""The block form of a model-centric method: one tensor's merge as the streaming engine's block kernel computes it.

Most of mergekit's methods end in the same elementwise step — a base (or zero) plus a weighted, optionally pruned and
sign-elected sum of the models (or of their differences from the base)::

    out = base + λ·δ,   δ = combine_i(w_i · prune_i(v_i)),   v_i = θ_i − base  (``relative``)  or  θ_i

(:mod:`capmerge.merge.compute`'s ``merge_block``, the kernel behind ``capmerge apply``). What differs is how the
weights and pruning thresholds are found: from the parameters alone (linear, task_arithmetic), from exact k-th largest
magnitudes (ties, breadcrumbs), from L1 norms (``rescale``), or from the Gram matrix of the inputs (slerp, nuslerp,
multislerp, karcher, model_stock: every one of them is, per tensor, a linear combination of its inputs with
coefficients computed from their norms and dot products).

A method's *form* (``ModelMethod.form``) maps a :class:`Spec` — what is known before a byte is read — to a ``finish``
function, or to None where its parameters leave the form (then the method's float32 ``fn`` runs instead).
``finish(stats)`` reads what statistics it needs through :class:`Stats` and returns the :class:`Combo`. Both callers
use the same two steps, so they give the same bits:

* the streaming runner (:mod:`capmerge.merge.modelmerge`): ``finish`` runs as the job's prepare pass (its reads are
  blocks of the stored inputs), then the engine runs the kernel block by block, reading, computing and writing in
  parallel, in memory that does not depend on the tensor's size;
* the per-tensor ``fn`` (:func:`run_whole`, e.g. :func:`capmerge.merge_state_dicts`): the same ``finish`` over the
  whole float32 tensors, then the kernel once.

Statistics are exact or double precision: thresholds are exact k-th largest magnitudes; sums of products and
magnitudes are accumulated in float64 over fixed blocks of :data:`STAT_BLOCK` elements (the same order whatever
reads them), so the coefficients do not depend on how the data is stored or split.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from capmerge.merge import compute

if TYPE_CHECKING:
    import torch

TensorInputs = Any  # capmerge.merge.methods.models.TensorInputs (which imports this module)

STAT_BLOCK = 1 << 19  # elements per statistics call (fixed: the float64 sums' order does not depend on the reader)
NONE, MAGNITUDE, RANDOM, BAND, BITS, NEAR = (compute.PRUNE_NONE, compute.PRUNE_MAGNITUDE, compute.PRUNE_RANDOM,
                                             compute.PRUNE_BAND, compute.PRUNE_BITS, compute.PRUNE_NEAR)  # fmt: skip
KEEP_ALL: tuple[int, float, float, int] = (NONE, 0.0, 0.0, 0)
DROP_ALL: tuple[int, float, float, int] = (BAND, math.inf, math.inf, 0)  # inf ≤ |t| < inf holds for no entry

Read = Callable[[int, int, int], memoryview]
"""read(input, start, end): elements [start, end) of an input (0 = the base when there is one, then the models)."""


@dataclass(frozen=True)
class Term:
    """w·prune(v_i) for model ``model`` (−1: the base itself); ``prune`` = (mode, p1, p2, key) as
    :func:`compute.merge_block` takes it."""

    model: int
    weight: float
    prune: tuple[int, float, float, int] = KEEP_ALL
    bits: Any = None  # prune mode BITS: the keep bits of the whole tensor (Moments.masks)


@dataclass(frozen=True)
class Combo:
    """One tensor's elementwise step (see the module's docstring). ``with_base``: add the base (else zero);
    ``relative``: v_i = θ_i − base (needs the base)."""

    terms: Sequence[Term]
    relative: bool = False
    with_base: bool = False
    sign: str = "none"
    normalize: bool | int = False  # or compute.NORMALIZE_FLOOR
    lam: float = 1.0


@dataclass(frozen=True)
class Spec:
    """What a method's form sees before reading: the tensor and its resolved parameters."""

    name: str
    shape: tuple[int, ...]
    params: Mapping[str, Any]
    model_params: Sequence[Mapping[str, Any]]
    has_base: bool
    seed: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_models(self) -> int:
        return len(self.model_params)


Finish = Callable[["Stats"], Combo]


@dataclass(frozen=True)
class Copy:
    """A form's answer for an output that is model ``model`` unchanged (the runner copies its bytes)."""

    model: int

    def as_finish(self) -> Finish:
        return lambda st: Combo([Term(self.model, 1.0)])


Form = Callable[[Spec], "Finish | Copy | None"]


@dataclass
class Moments:
    """Sums over one tensor: ``gram[i][j]`` = Σ v_i·v_j, ``l1[i]`` = Σ|v_i|, ``kept[i]`` = Σ|prune_i(v_i)|;
    ``masks[i]``: the keep bits of a randomly pruned v_i when asked for (else None)."""

    gram: list[list[float]]
    l1: list[float]
    kept: list[float]
    masks: list[Any] = field(default_factory=list)

    def norm(self, i: int) -> float:
        return math.sqrt(max(self.gram[i][i], 0.0))


@dataclass
class Stats:
    """Statistics of one tensor's inputs, read through ``read`` (codes: each input's dtype code)."""

    read: Read
    codes: Sequence[str]
    has_base: bool
    numel: int
    _cache: dict[Any, Any] = field(default_factory=dict)

    def _model(self, i: int) -> int:
        return i + 1 if self.has_base else i

    def kth_abs(self, i: int, ks: Sequence[int], *, relative: bool = True) -> dict[int, float]:
        """The k-th largest |v_i| for each k of ``ks`` (exact; k ≤ 0 gives inf)."""
        return self.kth_abs_many({i: ks}, relative=relative)[i]

    def kth_abs_many(self, wanted: dict[int, Sequence[int]], *, relative: bool = True) -> dict[int, dict[int, float]]:
        """:meth:`kth_abs` for several models (i -> ks) in one pass, reading the base once per block for all."""
        from capmerge.merge.plan import kth_largest_abs_many

        b = 0 if relative and self.has_base else None
        cb = self.codes[0] if b is not None else "F32"
        items = [(self._model(i), self.codes[self._model(i)], list(ks)) for i, ks in wanted.items()]
        got = kth_largest_abs_many(self.read, items, b, cb, self.numel)
        return dict(zip(wanted, got, strict=True))

    def moments(self, *, relative: bool = False, prune: Sequence[tuple[int, float, float, int]] | None = None,
                gram: bool = True, l1: bool = False, include_base: bool = False,
                masks: bool = False) -> Moments:  # fmt: skip
        """Gram matrix (``gram``) and L1 norms of the v_i (``l1``; those of pruned v_i always), in float64 over
        blocks of STAT_BLOCK. ``include_base``: the base itself is vector 0, the models follow (then ``relative``
        must be false). Sums not asked for are 0. ``masks``: also record the keep bits of every randomly pruned
        vector (one bit per element, n/8 bytes each), for a merge pass that replays them instead of drawing the
        same Philox numbers again."""
        ins = [self._model(i) for i in range(len(self.codes) - (1 if self.has_base else 0))]
        if include_base and self.has_base:
            ins = [0, *ins]
        k = len(ins)
        prune = list(prune) if prune is not None else [KEEP_ALL] * k
        key = ("moments", relative, tuple(prune), gram, l1, include_base, masks)
        if key in self._cache:
            return self._cache[key]
        import numpy as np

        bits = [np.zeros((self.numel + 7) // 8, dtype=np.uint8) if masks and p[0] == RANDOM else None for p in prune]
        base = relative and self.has_base

        def block(s: int) -> Any:  # one block's sums (the keep bits go straight into their own bytes of ``bits``)
            e = min(self.numel, s + STAT_BLOCK)
            part = np.zeros(k * k + 2 * k, dtype=np.float64)
            views = [self.read(i, s, e) for i in ins]  # one scratch buffer per input
            bview = self.read(0, s, e) if base else None
            _moments_block(views, [self.codes[i] for i in ins], bview, self.codes[0] if base else "F32", e - s, s,
                           int(gram) | (0 if l1 else 2), prune, part, bits if masks else None)  # fmt: skip
            return part

        out = np.zeros(k * k + 2 * k, dtype=np.float64)
        for part in map_blocks(block, range(0, self.numel, STAT_BLOCK)):
            out += part  # in block order, whichever thread computed the block
        g = out[: k * k].reshape(k, k).tolist()
        m = Moments(g, out[k * k : k * k + k].tolist(), out[k * k + k :].tolist(), bits)
        self._cache[key] = m
        return m

    def sce(self, thr: float | None = None, *, sums: bool = True, count: bool = True) -> tuple[int, list[float], Any]:
        """SCE's statistics of the task vectors v_i = θ_i − base (all models): var = their population variance per
        element (torch.var's float64 Welford steps, rounded to float32). Returns (#{var ≠ 0}, Σ v_i² per model over
        every element — or, with ``thr``, over the elements where var ≥ thr —, the keep bits of var ≥ thr or None);
        ``sums`` False: the count only; ``count`` False (no ``thr``): the sums only, without the variance (the count
        reads 0). Sums in float64 over STAT_BLOCK blocks, added in block order."""
        import numpy as np

        k = len(self.codes) - 1
        early = self._cache.pop("sce_early", None)
        if thr is not None and sums and early is not None and early.covers(thr):
            return early.finish(thr)
        bits = np.zeros((self.numel + 7) // 8, dtype=np.uint8) if thr is not None else None

        def block(s: int) -> tuple[int, Any]:
            e = min(self.numel, s + STAT_BLOCK)
            part = np.zeros(k, dtype=np.float64) if sums or thr is not None else None
            nnz = self._sce_block(s, e, None, thr, bits, part, count or thr is not None)
            return nnz, part

        nonzero, total = 0, np.zeros(k, dtype=np.float64)
        for nnz, part in map_blocks(block, range(0, self.numel, STAT_BLOCK)):
            nonzero += nnz
            if part is not None:
                total += part
        return nonzero, total.tolist(), bits

    def sce_variance_kth(self, ks: Sequence[int]) -> dict[int, float]:
        """The k-th largest of SCE's per-element variance (exact, :meth:`sce`'s float32 values) for each k of ``ks``:
        a threshold pass over the variance computed block by block, never stored whole."""
        from capmerge.merge.plan import ThreadScratch, kth_largest_abs_many

        scratch = ThreadScratch()

        def read(i: int, s: int, e: int) -> memoryview:
            out = scratch.get(4 * (e - s))
            self._sce_block(s, e, out, None, None, None)
            return out

        return kth_largest_abs_many(read, [(0, "F32", list(ks))], None, "F32", self.numel)[0]

    def sce_selection(self, share: float) -> tuple[int, float]:
        """SCE's selection: k = int(share · #{var ≠ 0}) and the k-th largest variance (inf for k = 0), in one
        threshold pass that also counts the nonzero variances (native inputs; else a count pass, then
        :meth:`sce_variance_kth`). A bracket is chosen for k estimated from the nonzero share of its sample."""
        from capmerge.merge.plan import SAMPLE_PIECE, SAMPLE_PIECES, ThreadScratch, kth_largest_abs_many, sample_pieces

        n = self.numel
        if not compute.use_native(*self.codes):
            k = int(self.sce(sums=False)[0] * share)
            return k, (self.sce_variance_kth([k])[k] if k > 0 else math.inf)
        scratch = ThreadScratch()
        nonzero: dict[tuple[int, int], int] = {}  # block -> #{var ≠ 0}: each block of the pass once, however often read

        pre = _SceEarly(len(self.codes) - 1, n)
        lists = ThreadScratch()
        sampled: dict[tuple[int, int], memoryview] = {}  # the sample's pieces -> their variance (float32 bytes)

        def read(i: int, s: int, e: int) -> memoryview:
            if pre.hi is None and (s, e) in sampled:  # the bracket's sample
                return sampled[(s, e)]
            out = scratch.get(4 * (e - s))
            if pre.hi is not None and s not in pre.blocks:  # the bracketed pass: bits and energies, the list
                nonzero[(s, e)], got = pre.block(self, s, e, out, lists)
                return got
            nonzero[(s, e)] = self._sce_block(s, e, out, None, None, None)  # no bracket, or a pass after it
            return out

        k_est = 1  # no bracket below BRACKET_MIN (the sample's size): any estimate
        if n >= SAMPLE_PIECES * SAMPLE_PIECE:
            pieces = sample_pieces(n)
            nnz = self._sce_sample(pieces, sampled)
            k_est = max(1, int(nnz / (SAMPLE_PIECES * SAMPLE_PIECE) * n * share))
        got: list[int] = []

        def after(whole: list[tuple[int, int]]) -> dict[int, list[int]]:
            got.append(int(sum(nonzero[b] for b in whole) * share))
            return {0: got}

        vals = kth_largest_abs_many(read, [(0, "F32", [k_est])], None, "F32", n, after_pass=after,
                                    on_bracket=lambda j, lo, hi: pre.set_bracket(lo, hi))[0]  # fmt: skip
        self._cache["sce_early"] = pre
        return got[0], vals[got[0]]

    def _sce_block(
        self,
        s: int,
        e: int,
        var: Any,
        thr: float | None,
        bits: Any,
        sums: Any,
        count: bool = True,
        listing: tuple[float, Any, Any, Any] | None = None,
    ) -> Any:
        """Elements [s, e) of :meth:`sce`: the variance into ``var`` (a float32 buffer, or None), the keep bits of
        var ≥ ``thr`` and the sums into ``sums``; returns #{var ≠ 0} there. ``listing`` (lo, idx, var, tau; native
        only): the entries with lo ≤ var < thr listed too, and the result is (#{var ≠ 0}, how many, −1: too many,
        #{|var|'s bit pattern ≥ thr's}: var ≥ thr and NaN)."""
        k = len(self.codes) - 1
        views = [self.read(i, s, e) for i in range(1, k + 1)]
        base = self.read(0, s, e)
        if compute.use_native(*self.codes):
            return self._native_sce(views, base, e - s, s if bits is not None else 0, var, thr, bits, sums, count,
                                    listing)  # fmt: skip
        return _torch_sce(views, self.codes[1:], base, self.codes[0], e - s, s, var, thr, bits, sums)

    def _native_sce(self, views: list[Any], base: Any, n: int, offset: int, var: Any, thr: float | None, bits: Any,
                    sums: Any, count: bool = True, listing: tuple[float, Any, Any, Any] | None = None,
                    ) -> Any:  # fmt: skip
        """The native ``sce`` call over the models' ``views`` and the ``base`` (n elements; see :meth:`_sce_block`)."""
        from capmerge.merge.compute import _native

        out = memoryview(sums).cast("B") if sums is not None else None
        return _native.sce([(v, compute.NATIVE_CODES[c]) for v, c in zip(views, self.codes[1:], strict=True)],
                           base, compute.NATIVE_CODES[self.codes[0]], n, offset, var,
                           math.nan if thr is None else thr, bits, out, count, *(listing or ()))  # fmt: skip

    def _sce_sample(self, pieces: Sequence[tuple[int, int]], into: dict[tuple[int, int], memoryview]) -> int:
        """The variance of the bracket's sample (native inputs): the pieces of every input joined, one native call
        over them (a call per piece spent more in Python than in the kernel); each piece's variance (float32 bytes)
        into ``into``. Returns #{var ≠ 0} over the sample."""
        import numpy as np

        k = len(self.codes) - 1
        joined = [bytearray() for _ in range(k + 1)]
        for i, buf in enumerate(joined):
            for s, e in pieces:
                buf += self.read(i, s, e)  # copied at once: a read into a scratch buffer lasts until the next
        m = sum(e - s for s, e in pieces)
        var = np.empty(m, dtype=np.float32)
        nnz = self._native_sce(joined[1:], joined[0], m, 0, var, None, None, None)
        flat, o = memoryview(var).cast("B"), 0
        for s, e in pieces:
            into[(s, e)] = flat[4 * o : 4 * (o + e - s)]
            o += e - s
        return int(nnz)

    def della(self, terms: Sequence[tuple[int, int, int, int]], m: int) -> dict[int, tuple[float, float, Any]]:
        """DELLA's keep bits of v_i = θ_i − base over rows of ``m`` consecutive elements for each term (model i, xl,
        xh, key): :func:`capmerge.functional.della_keep`'s test with the draws' band [xl, xh)
        (:func:`~capmerge.functional.della_bounds`), every model in one pass (the base read once a block). Returns
        model -> (Σ|v_i|, Σ|kept|, bits); the sums are float64 over blocks of whole rows (a multiple of 8
        elements), summed in block order."""
        import numpy as np

        from capmerge.merge.compute import _native

        if m < 1 or self.numel % m:
            raise ValueError(f"della: {self.numel} entries are not rows of {m}")
        rows = self.numel // m
        step = max(1, STAT_BLOCK // m)
        q = 8 // math.gcd(m, 8)  # blocks start on whole bytes of the keep bits
        step = max(q, step - step % q)
        bits = {i: np.zeros((self.numel + 7) // 8, dtype=np.uint8) for i, *_ in terms}
        base, bc = (0, compute.NATIVE_CODES.get(self.codes[0], 0)) if self.has_base else (None, 0)
        native = compute.use_native(*(self.codes[self._model(i)] for i, *_ in terms), *self.codes[:1])

        def block(r0: int) -> list[tuple[float, float]]:
            r1 = min(rows, r0 + step)
            s, e = r0 * m, r1 * m
            bview = self.read(base, s, e) if base is not None else None
            views = [(self.read(self._model(i), s, e), self.codes[self._model(i)]) for i, *_ in terms]
            if native:
                ts = [(v, compute.NATIVE_CODES[c], key, xl, xh, bits[i])
                      for (v, c), (i, xl, xh, key) in zip(views, terms, strict=True)]  # fmt: skip
                return _native.della(ts, bview, bc, r1 - r0, m, s)
            return [_torch_della(v, c, bview, self.codes[0], r1 - r0, m, s, key, xl, xh, bits[i])
                    for (v, c), (i, xl, xh, key) in zip(views, terms, strict=True)]  # fmt: skip

        sums = [(0.0, 0.0)] * len(terms)
        for got in map_blocks(block, range(0, rows, step)):
            sums = [(l1 + a, kept + b) for (l1, kept), (a, b) in zip(sums, got, strict=True)]
        return {i: (l1, kept, bits[i]) for (i, *_), (l1, kept) in zip(terms, sums, strict=True)}


STAT_PARALLEL_MIN = 2  # blocks: a statistics pass over fewer runs on the calling thread alone


class _SceEarly:
    """SCE's keep bits and energies made in its selection's pass (:meth:`Stats.sce_selection`), in place of a pass of
    their own. Once the sample has bracketed the threshold in [lo, hi) (every rank it settles lies there), each block
    of the pass over the whole sets the bits of var ≥ hi and adds their v_i² (float64, in the kernel's order, per
    block) and lists the entries with lo ≤ var < hi (index, var, v_i: a share of a per cent or so); :meth:`finish`,
    given the threshold, adds the listed ones at or above it. Blocks read again (a later pass) are simply redone; a
    list that outgrows its room, or a threshold outside the bracket, leaves :meth:`Stats.sce` to its own pass."""

    LIST_SHARE = 16  # room for 1/16 of a block's entries in its list

    def __init__(self, k: int, n: int) -> None:
        self.k, self.n = k, n
        self.lo: float | None = None
        self.hi: float | None = None
        self.bits: Any = None  # the tensor's keep bits, once there is a bracket
        self.blocks: dict[int, tuple[int, Any, Any, Any, Any] | None] = {}  # start -> (nnz, sums, idx, var, tau)
        self._lock = threading.Lock()

    def set_bracket(self, lo: float, hi: float) -> None:
        import numpy as np

        self.bits = np.zeros((self.n + 7) // 8, dtype=np.uint8)
        self.lo, self.hi = lo, hi

    def block(self, st: Stats, s: int, e: int, out: Any, lists: Any) -> tuple[int, Any]:
        """The pass's block [s, e): bits and sums above the bracket, the entries inside it listed. Returns #{var ≠ 0}
        and the block for the bracket's histogram: a :class:`~capmerge.merge.plan.Inside` made from the list (no
        variance written out), or the variance in ``out`` where the list outgrew its room or the bracket has no
        finite top."""
        import numpy as np

        from capmerge.merge.plan import Inside

        assert self.lo is not None and self.hi is not None
        k, cap = self.k, (e - s) // self.LIST_SHARE
        room = cap + 16
        buf = np.frombuffer(lists.get(4 * room * (k + 2)), dtype=np.uint32, count=room * (k + 2))
        idx, var, tau = buf[:room], buf[room : 2 * room].view(np.float32), buf[2 * room :].view(np.float32)
        sums = np.zeros(k, dtype=np.float64)
        summary = math.isfinite(self.hi)
        nnz, listed, above = st._sce_block(s, e, None if summary else out, self.hi, self.bits, sums, True,
                                           (self.lo, idx, var, tau))  # fmt: skip
        got = None
        if listed >= 0:
            tau_kept = tau.reshape(k, room)[:, :listed].copy()
            got = (nnz, sums, idx[:listed].copy(), var[:listed].copy(), tau_kept)
        with self._lock:
            self.blocks[s] = got
        if summary and got is not None:
            return nnz, Inside(above, got[3])
        if summary:
            st._sce_block(s, e, out, None, None, None)
        return nnz, out

    def covers(self, thr: float) -> bool:
        """Whether the pass made everything for threshold ``thr``: inside the bracket, every block listed in full."""
        from capmerge.merge.plan import HIST_BLOCK

        starts = range(0, self.n, HIST_BLOCK)
        if self.lo is None or self.hi is None or not self.lo <= thr < self.hi or len(self.blocks) != len(starts):
            return False
        return all(self.blocks.get(s) is not None for s in starts)

    def finish(self, thr: float) -> tuple[int, list[float], Any]:
        """:meth:`Stats.sce`'s result for ``thr``: the sums above the bracket block by block, then the listed entries
        at or above ``thr`` in block and list order (their bits set)."""
        import numpy as np

        from capmerge.merge.compute import _native

        assert _native is not None
        order = sorted(self.blocks)
        total, nonzero = np.zeros(self.k, dtype=np.float64), 0
        for s in order:
            nnz, sums, _, _, _ = self.blocks[s]  # type: ignore[misc]
            total += sums
            nonzero += nnz
        for s in order:
            _, _, idx, var, tau = self.blocks[s]  # type: ignore[misc]
            _native.sce_finish(idx, var, tau, len(idx), thr, memoryview(self.bits)[s >> 3 :], total)
        return nonzero, total.tolist(), self.bits


def map_blocks(fn: Callable[[int], Any], starts: Sequence[int]) -> list[Any]:
    """``fn`` of each block start of a statistics pass, in block order: on the compute threads from
    :data:`STAT_PARALLEL_MIN` blocks on (callers combine the results in this order, the same on any thread count)."""
    from capmerge.merge.engine import parallel_map

    return parallel_map(fn, starts, parallel=len(starts) >= STAT_PARALLEL_MIN)


def _moments_block(views: list[Any], codes: list[str], base: Any, base_code: str, n: int, offset: int, flags: int,
                   prune: Sequence[tuple[int, float, float, int]], out: Any,
                   masks: list[Any] | None = None) -> None:  # fmt: skip
    """One block's sums added into ``out``; ``flags`` bit 0: the Gram matrix, bit 1: skip the L1 sums of vectors
    that are not pruned."""
    if compute.use_native(*codes, base_code):
        from capmerge import _native

        vecs = [
            (v, compute.NATIVE_CODES[c], p[0], p[1], p[2], p[3]) for v, c, p in zip(views, codes, prune, strict=True)
        ]
        _native.moments(vecs, base, compute.NATIVE_CODES[base_code], n, offset, flags, memoryview(out).cast("B"), masks)
        return
    _torch_moments(views, codes, base, base_code, n, offset, flags, prune, out, masks)


def _torch_moments(views: list[Any], codes: list[str], base: Any, base_code: str, n: int, offset: int, flags: int,
                   prune: Sequence[tuple[int, float, float, int]], out: Any,
                   masks: list[Any] | None = None) -> None:  # fmt: skip
    """The same sums without the native kernel (float64 throughout; the order of the sums may differ)."""
    import torch

    from capmerge import functional as F
    from capmerge._torch import as_tensor

    k = len(views)
    b = as_tensor(base, base_code)[:n].float() if base is not None else None
    vs = []
    for i, (v, c) in enumerate(zip(views, codes, strict=True)):
        x = as_tensor(v, c)[:n].float()
        x = x - b if b is not None else x
        mode, p1, p2, key = prune[i]
        a = x.abs()
        if mode == MAGNITUDE:
            keep = a >= p1
        elif mode == BAND:
            keep = (a >= p1) & (a < p2)
        elif mode == RANDOM:
            keep = F.philox_range(key, offset, n) < torch.tensor(p1)
            if masks is not None and masks[i] is not None:  # offsets are multiples of 8 but for the tail
                _set_bits(masks[i], offset, keep.numpy())
        else:
            keep = torch.ones_like(a, dtype=torch.bool)
        if not flags & 2:
            out[k * k + i] += float(a.double().sum())
        if not flags & 2 or mode != NONE:
            out[k * k + k + i] += float(torch.where(keep, a, torch.zeros_like(a)).double().sum())
        vs.append(x.double())
    if flags & 1:
        for i in range(k):
            for j in range(i, k):
                out[i * k + j] += float(torch.dot(vs[i], vs[j]))
                if j != i:
                    out[j * k + i] = out[i * k + j]


def _torch_della(view: Any, code: str, base: Any, base_code: str, rows: int, m: int, offset: int, key: int,
                 xl: int, xh: int, bits: Any) -> tuple[float, float]:  # fmt: skip
    """:meth:`Stats.della`'s block without the native kernel (the same keep bits; float64 sums in torch's order)."""
    import torch

    from capmerge import functional as F
    from capmerge._torch import as_tensor

    n = rows * m
    v = as_tensor(view, code)[:n].float()
    if base is not None:
        v = v - as_tensor(base, base_code)[:n].float()
    a = v.abs()
    keep = F.della_rows(v.reshape(rows, m), F.philox_ints(key, offset, n).reshape(rows, m), xl, xh).reshape(-1)
    _set_bits(bits, offset, keep.numpy())
    return float(a.double().sum()), float(torch.where(keep, a, torch.zeros_like(a)).double().sum())


def _torch_sce(views: list[Any], codes: Sequence[str], base: Any, base_code: str, n: int, offset: int, var: Any,
               thr: float | None, bits: Any, sums: Any) -> int:  # fmt: skip
    """:meth:`Stats._sce_block` without the native kernel (the same variance and bits; sums in torch's order)."""
    import torch

    from capmerge._torch import as_tensor
    from capmerge.functional import population_variance

    b = as_tensor(base, base_code)[:n].float()
    taus = [as_tensor(v, c)[:n].float() - b for v, c in zip(views, codes, strict=True)]
    v = population_variance(taus)
    if var is not None:
        as_tensor(var, "F32")[:n].copy_(v)
    if sums is not None:
        keep = (v >= thr) if thr is not None else None
        if keep is not None and bits is not None:
            _set_bits(bits, offset, keep.numpy())
        for i, t in enumerate(taus):
            x = t.double()
            sums[i] += float((x * x if keep is None else keep.double() * (x * x)).sum())
    return int(torch.count_nonzero(v))


def _set_bits(mask: Any, offset: int, keep: Any) -> None:
    import numpy as np

    for j in np.flatnonzero(keep[: (-offset) % 8]):  # a head before the first whole byte (never, in practice)
        mask[(offset + j) // 8] |= 1 << ((offset + j) % 8)
    head = (-offset) % 8
    packed = np.packbits(keep[head:], bitorder="little")
    mask[(offset + head) // 8 : (offset + head) // 8 + len(packed)] |= packed


# ------------------------------------------------------------------------------------------------- the kernel


class ModelKernel:
    """The engine's kernel of one output tensor (inputs: the base first when there is one, then the models);
    :meth:`prepare` runs the form's ``finish`` (the statistics pass), calls compute the blocks."""

    def __init__(self, name: str, finish: Finish, codes: Sequence[str], has_base: bool, numel: int,
                 out_code: str) -> None:  # fmt: skip
        self.name, self.finish, self.codes, self.has_base, self.numel = name, finish, list(codes), has_base, numel
        self.out_code = out_code
        self.combo: Combo | None = None
        self._done = 0  # elements computed: the combo (and any keep bits it holds) is dropped after the last block
        self._lock = threading.Lock()

    def prepare(self, read: Read) -> None:
        self.combo = self.finish(Stats(read, self.codes, self.has_base, self.numel))
        if (self.combo.relative or self.combo.with_base) and not self.has_base:
            raise ValueError(f"tensor {self.name}: the merge needs a base model")

    def __call__(self, views: list[memoryview], outs: list[memoryview], n: int, offset: int) -> int:
        c = self.combo
        assert c is not None, "prepare() first"
        first = 1 if self.has_base else 0
        if c.with_base:
            base, base_code = views[0], self.codes[0]
        else:  # zeros, as bf16: every loop reads them as +0.0, and the bf16 loops take bf16 inputs only
            base, base_code = _zeros(2 * n), "BF16"
        bview = views[0] if c.relative else None
        terms = [
            (views[first + t.model], self.codes[first + t.model], bview, self.codes[0], t.weight, *t.prune,
             *([t.bits] if t.bits is not None else []))
            for t in c.terms
        ]  # fmt: skip
        kw = {"sign": c.sign, "normalize": c.normalize, "offset": offset}
        flags = compute.merge_block([(o, self.out_code, c.lam) for o in outs], base, base_code, n, terms, **kw)
        with self._lock:  # the engine computes each element once (blocks may be split across threads)
            self._done += n
            if self._done >= self.numel:
                self.combo = None
        return flags


_ZERO = bytearray()  # one zero buffer for every kernel without a base (it only grows, to the largest block)
_ZERO_LOCK = threading.Lock()


def _zeros(nbytes: int) -> memoryview:
    global _ZERO
    with _ZERO_LOCK:
        if len(_ZERO) < nbytes:
            _ZERO = bytearray(nbytes)
        return memoryview(_ZERO)[:nbytes]


def spec_of(x: TensorInputs) -> Spec:
    shape = tuple((x.base if x.base is not None else x.models[0]).shape) if (x.base is not None or x.models) else ()
    return Spec(x.name, shape, x.params, x.model_params, x.base is not None, x.seed)


def run_whole(finish: Finish, x: TensorInputs) -> torch.Tensor:
    """``finish`` and the kernel over whole tensors: what the streaming runner computes, as one float32 tensor."""
    import torch

    ins = ([x.base] if x.base is not None else []) + list(x.models)
    flat = [t.detach().to("cpu", torch.float32).contiguous().reshape(-1) for t in ins]
    mvs = [memoryview(t.numpy()).cast("B") for t in flat]
    shape = tuple(ins[0].shape)
    n = flat[0].numel()

    def read(i: int, s: int, e: int) -> memoryview:
        return mvs[i][4 * s : 4 * e]

    kernel = ModelKernel(x.name, finish, ["F32"] * len(ins), x.base is not None, n, "F32")
    kernel.prepare(read)
    out = torch.empty(n, dtype=torch.float32)
    kernel(list(mvs), [memoryview(out.numpy()).cast("B")], n, 0)
    return out.reshape(shape)


def with_form(form: Form, fallback: Callable[[TensorInputs], torch.Tensor] | None = None,
              *, refuse: str = "") -> Callable[[TensorInputs], torch.Tensor]:  # fmt: skip
    """The per-tensor ``fn`` of a method with a form: the form where it applies, else ``fallback`` (a method whose
    form takes every valid input has none: there ``refuse`` says what the inputs lack)."""

    def fn(x: TensorInputs) -> torch.Tensor:
        finish = form(spec_of(x))
        if isinstance(finish, Copy):
            return x.models[finish.model].float().clone()
        if finish is not None:
            return run_whole(finish, x)
        if fallback is None:
            raise ValueError(f"tensor {x.name}: {refuse}")
        return fallback(x)

    return fn


def fp32(x: float) -> float:
    """``x`` rounded to float32, as torch rounds a float32 tensor's value."""
    import numpy as np

    with np.errstate(over="ignore"):
        return float(np.float32(x))
