"""Reference merge math as short pure-torch functions.

For one base tensor θ and vectors τ_1..τ_K with weights w_i and global scale α:

1. **Prune** each τ_i to τ̃_i (per-vector density d_i ∈ (0, 1]):

   * ``magnitude``: keep |τ| ≥ v_k, the k-th largest |τ|, k = max(1, ⌊d·n + ½⌋); ties at the threshold are kept, so
     slightly more than k entries can survive when several share the threshold value.
   * ``random`` (DARE): keep an entry when u < d, u = Philox uniform of (key, element index) (:func:`philox_uniform`:
     Triton's ``tl.rand4x(key, index // 4)[index % 4]``); with ``rescale`` kept entries are divided by d.
   * ``breadcrumbs``: drop the ⌊γ·n + ½⌋ largest magnitudes (ties at that threshold dropped with them) and the
     smallest, so that k entries remain: keep v_lo ≤ |τ| < v_hi.

2. **Elect signs** (``total``: s = Σ_i w_i·τ̃_i; ``frequency``: s = Σ_i sign(τ̃_i)); the elected sign is + where
   s ≥ 0 (a tie elects +, as mergekit does) and − elsewhere. m_i = [sign(τ̃_i) = elected sign]; zeros never count.
   Without sign election m_i = 1.
3. **Combine**: δ = Σ_i w_i·m_i·τ̃_i (summed in order i = 1..K, starting from 0); with ``normalize`` δ is divided
   elementwise by Σ_i w_i·m_i where that is > 0.
4. θ_out = θ + α·δ in float32, rounded once to the output dtype.

Every step is float32 (products and sums rounded separately, no fused multiply-add), which is exactly what the
native kernel (``capmerge/_native.c``) computes block by block; the tests compare the two bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from capmerge.merge.methods.base import keep_count, tensor_key  # noqa: F401 - torch-free, re-exported here

if TYPE_CHECKING:
    import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
_M32 = 0xFFFFFFFF


def _philox4(key: int, q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four output words (int64 holding uint32) of Philox4x32-10 at counters ``q``: counter (q_lo, q_hi, 0, 0),
    key (key_lo, key_hi) — Triton's ``randint4x(key, q)``. Written with int64 torch ops (products of two 32-bit words
    fit in 63 bits after splitting) so it runs anywhere."""
    import torch

    c0, c1 = q & _M32, (q >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = key & _M32, (key >> 32) & _M32

    def mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a·b with a, b < 2^32: split b in 16-bit halves so every partial product stays below 2^63
        lo16, hi16 = b & 0xFFFF, b >> 16
        p_lo = a * lo16
        p_hi = a * hi16
        low = (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32
        high = (p_hi + (p_lo >> 16)) >> 16
        return high & _M32, low

    for _ in range(10):
        hb, lb = mulhilo(PHILOX_ROUND_B, c2)
        ha, la = mulhilo(PHILOX_ROUND_A, c0)
        c0, c2, c1, c3 = hb ^ c1 ^ k0, ha ^ c3 ^ k1, lb, la
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _fold(word: torch.Tensor) -> torch.Tensor:
    """tl.rand's integer of a uint32 word (held in int64) before its scaling: as int32 x, x < 0 ? -x - 1 : x."""
    import torch

    x = torch.where(word >= 2**31, word - 2**32, word)
    return torch.where(x < 0, -x - 1, x)


def _uniform_of(word: torch.Tensor) -> torch.Tensor:
    """tl.rand's float of a uint32 word (held in int64): :func:`_fold`'s integer · 2^-31."""
    import torch

    x = _fold(word)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=x.device)


def philox_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) for each int64 element index: word ``index % 4`` of Philox4x32-10 at counter
    ``index // 4`` — Triton's ``tl.rand4x(key, index // 4)[index % 4]`` — so that one Philox call serves four
    consecutive elements. For a run of consecutive indices :func:`philox_range` gives the same numbers with each
    counter computed once."""
    import torch

    idx = index.to(torch.int64)
    words = torch.stack(_philox4(key, idx >> 2))
    return _uniform_of(words.gather(0, (idx & 3).unsqueeze(0)).squeeze(0))


def philox_range(key: int, start: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``philox_uniform(key, arange(start, start + n))``: the counters the run covers, each computed once, their
    four words laid out in element order."""
    import torch

    if n <= 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    return _uniform_of(_words(key, start, n, device))


def philox_ints(key: int, start: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The integers in [0, 2^31) behind :func:`philox_range`'s floats (tl.rand's, before the scaling by 2^-31): int64,
    one per element of ``start .. start + n - 1``."""
    return _fold(_words(key, start, n, device))


def _words(key: int, start: int, n: int, device: torch.device | str | None) -> torch.Tensor:
    """The Philox words of elements start .. start + n - 1 (n ≥ 1): word i % 4 of counter i // 4, int64."""
    import torch

    first = start >> 2
    q = torch.arange(first, ((start + n - 1) >> 2) + 1, dtype=torch.int64, device=device)
    stream = torch.stack(_philox4(key, q), dim=1).reshape(-1)
    return stream[start - 4 * first : start - 4 * first + n]


def kth_largest_abs(t: torch.Tensor, k: int) -> float:
    """The k-th largest |t| (1-based) as a float32 value; +inf when k = 0."""
    import torch

    if k <= 0:
        return math.inf
    a = t.detach().reshape(-1).float().abs()
    return float(torch.topk(a, k, sorted=True).values[-1])


def magnitude_threshold(t: torch.Tensor, density: float) -> float:
    return kth_largest_abs(t, keep_count(density, t.numel()))


def magnitude_prune(t: torch.Tensor, density: float | None = None, *, threshold: float | None = None) -> torch.Tensor:
    """Keep entries with |t| ≥ the k-th largest |t| (k = max(1, ⌊d·n + ½⌋)); the rest become 0. float32 result."""
    import torch

    x = t.float()
    if threshold is None:
        if density is None:
            raise ValueError("magnitude_prune needs density or threshold")
        if density >= 1.0:
            return x.clone()
        threshold = magnitude_threshold(t, density)
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def random_prune(t: torch.Tensor, density: float, *, key: int, offset: int = 0, rescale: bool = True) -> torch.Tensor:
    """DARE: keep an entry where philox_uniform(key, offset + index) < d; kept entries divided by d with rescale."""
    import torch

    x = t.float().reshape(-1)
    if density >= 1.0:
        return x.reshape(t.shape).clone()
    u = philox_range(key, offset, x.numel(), x.device)
    dens = torch.tensor(density, dtype=torch.float32, device=x.device)
    kept = x / dens if rescale else x
    return torch.where(u < dens, kept, torch.zeros_like(x)).reshape(t.shape)


def breadcrumbs_thresholds(t: torch.Tensor, density: float, gamma: float = 0.01) -> tuple[float, float]:
    """(lo, hi) such that lo ≤ |t| < hi keeps k = max(1, ⌊d·n + ½⌋) entries below the ⌊γ·n + ½⌋ largest.

    The outlier cut shrinks when needed so that k entries remain (as mergekit does).
    """
    n = t.numel()
    k = keep_count(density, n)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    top = min(math.floor(gamma * n + 0.5), n - k)
    hi = kth_largest_abs(t, top) if top > 0 else math.inf
    return kth_largest_abs(t, top + k), hi


def breadcrumbs_prune(
    t: torch.Tensor, density: float, gamma: float = 0.01, *, thresholds: tuple[float, float] | None = None
) -> torch.Tensor:
    """Drop the largest γ fraction of magnitudes and the smallest, keeping a fraction d: lo ≤ |t| < hi."""
    import torch

    x = t.float()
    lo, hi = thresholds if thresholds is not None else breadcrumbs_thresholds(t, density, gamma)
    a = x.abs()
    return torch.where((a >= lo) & (a < hi), x, torch.zeros_like(x))


def rescale_l1(t: torch.Tensor, pruned: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``pruned`` scaled so that its L1 norm equals ``t``'s: pruned·(‖t‖₁ / ‖pruned‖₁), the ratio rounded to float32.

    mergekit's ``rescale`` for every pruning method: unchanged when either norm is below ``eps``. (For DARE the ratio
    is ≈ 1/d, the paper's factor, but exact in norm rather than in expectation.) The norms are summed in float64 and
    rounded to float32 (mergekit sums in float32, whose rounding depends on the summation order), as the streaming
    form of the model-centric methods sums them.
    """
    x, y = t.float(), pruned.float()
    before, after = x.abs().double().sum().float(), y.abs().double().sum().float()
    if float(before) < eps or float(after) < eps:
        return y
    return y * (before / after)


def population_variance(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Var_i(τ_i) per entry, bit for bit ``torch.var(torch.stack(taus), dim=0, unbiased=False)`` (Welford's update in
    float64, rounded to float32 — what torch does on the CPU) in elementwise steps, without the strided reduction
    over a stacked copy (3–25× faster here)."""
    import torch

    mean = torch.zeros(taus[0].shape, dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    for i, t in enumerate(taus, start=1):
        x = t.double()
        d = x - mean
        mean += d / i
        m2 += d * (x - mean)
    return (m2 / len(taus)).float()


def della_table(m: int, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of each 0-based rank r of a row of m entries: d − ε + 2ε·r/(m − 1) (float32, each
    step rounded as torch rounds it; d for a row of one entry)."""
    import torch

    ranks = torch.arange(m, dtype=torch.float32)
    frac = ranks / (m - 1) if m > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon) + frac * (2 * epsilon)


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """The 0-based rank of each entry within its row (the last dimension), ascending, ties in index order (a stable
    argsort; NaN last): int64, ``rows``' shape."""
    import torch

    order = torch.argsort(rows, dim=-1, stable=True)
    ranks = torch.empty_like(order)  # the inverse permutation of order
    m = rows.shape[-1]
    return ranks.scatter_(-1, order, torch.arange(m, dtype=torch.int64, device=rows.device).expand(order.shape))


def della_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of each entry: p = d − ε + 2ε·(r − 1)/(m − 1), r the rank of |t| (1 = smallest, ties
    ranked in index order) among the m entries of its row (dim 1; a 1-D tensor is one row). float32, t's shape.

    A row of one entry gets p = d. :func:`della_keep` keeps each entry with this probability (to 2^-31).
    """
    x = t.float()
    rows = _della_rows_of(x)
    return _della_unrows(della_table(rows.shape[-1], density, epsilon).to(x.device)[row_ranks(rows.abs())], x)


def _della_rows_of(x: torch.Tensor) -> torch.Tensor:
    """DELLA's rows of ``x`` along the last dimension: dim 1 moved last; a tensor of fewer dimensions is one row."""
    return x.reshape(1, -1) if x.dim() < 2 else x.movedim(1, -1)


def _della_unrows(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """:func:`_della_rows_of` undone: ``r`` (rows of ``like``) in ``like``'s layout, contiguous."""
    return (r.reshape(like.shape) if like.dim() < 2 else r.movedim(-1, 1)).contiguous()


def della_refusal(density: float, epsilon: float) -> str | None:
    """Why :func:`della_prune` refuses ``density`` ± ``epsilon`` (where it prunes, 0 < d < 1, d ± ε must lie in
    (0, 1)), or None."""
    if 0.0 < density < 1.0 and (density + epsilon >= 1 or density - epsilon <= 0):
        return f"epsilon must be chosen such that density ± epsilon is in (0, 1), got {density} ± {epsilon}"
    return None


def della_bounds(density: float, epsilon: float) -> tuple[int, int]:
    """(x_lo, x_hi) = (⌈(d − ε)·2^31⌉, ⌈(d + ε)·2^31⌉), clamped to [0, 2^31]: :func:`della_keep`'s band of draws."""
    lo, hi = (min(max(math.ceil(v * 2**31), 0), 2**31) for v in (density - epsilon, density + epsilon))
    return lo, hi


def della_keep(t: torch.Tensor, density: float, epsilon: float, *, key: int,
               words: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """DELLA's keep mask (bool, t's shape): entry j of a row (dim 1; a 1-D tensor is one row) of m entries is kept
    with probability :func:`della_probabilities`' p_j = d − ε + 2ε·r_j/(m − 1), independently, and with no ranks
    computed. Its draw is x_j = :func:`philox_ints` (key, j) (j the flat index), uniform in [0, 2^31):

    * x < x_lo (:func:`della_bounds`): kept (probability d − ε); x ≥ x_hi: dropped;
    * in between (probability 2ε): kept where |t_j| outranks entry o of its row — greater, or equal with j > o (NaN
      above everything, as in a stable ascending sort) — with t = ((x − x_lo)·R) >> 32, R = ⌊(m − 1)·2^32/(x_hi −
      x_lo)⌋ and o = t + [t ≥ j]: an entry drawn uniformly (to 2^-31) from the other m − 1, which |t_j| outranks with
      probability r_j/(m − 1). A row of one entry: kept where x − x_lo < ⌊(x_hi − x_lo)/2⌋ (probability d).

    The native kernel (``capmerge/_native.c``, ``della``) makes the same bits; ``words``: the draws (int64, t's
    shape), e.g. from it."""
    x = t.float()
    if words is None:
        words = philox_ints(key, 0, x.numel(), x.device).reshape(x.shape)
    keep = della_rows(_della_rows_of(x), _della_rows_of(words), *della_bounds(density, epsilon))
    return _della_unrows(keep, x)


def della_rows(rows: torch.Tensor, words: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """:func:`della_keep`'s test on rows along the last dimension (float32) with their draws (int64, the same shape)
    and the band [lo, hi) of :func:`della_bounds`: the keep mask."""
    import torch

    m = rows.shape[-1]
    if m >= 2**31:
        raise ValueError(f"della: rows of at most 2^31 - 1 entries, got {m}")
    keep = words < lo
    band = (words >= lo) & (words < hi)
    if m == 1:
        return keep | (band & (words - lo < (hi - lo) // 2))
    if hi > lo:
        r = ((m - 1) << 32) // (hi - lo)
        pick = (torch.where(band, words - lo, torch.zeros_like(words)) * r) >> 32
        j = torch.arange(m, device=rows.device)
        other = pick + (pick >= j).to(pick.dtype)
        k = rows.contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
        k = torch.where(k > 0x7F800000, torch.full_like(k, 0x7FC00000), k)  # every NaN one value, above +inf
        ko = k.gather(-1, torch.where(band, other, torch.zeros_like(other)))
        keep = keep | (band & ((k > ko) | ((k == ko) & (j > other))))
    return keep


def della_prune(t: torch.Tensor, density: float, epsilon: float, *, key: int, rescale: bool = True,
                words: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """DELLA (MagPrune): keep each entry with probability p_j (:func:`della_probabilities`, larger magnitudes more
    likely) by :func:`della_keep`'s test; with ``rescale`` the kept entries are scaled by :func:`rescale_l1` (as
    mergekit does). ``words(key, like)``: another source of :func:`philox_ints`' numbers (e.g. the native kernel's),
    shaped like ``like``.

    density ≥ 1 keeps everything (no rescale), density ≤ 0 nothing; otherwise d ± ε must lie in (0, 1).
    """
    import torch

    x = t.float()
    if density >= 1.0:
        return x.clone()
    if density <= 0.0:
        return torch.zeros_like(x)
    refused = della_refusal(density, epsilon)
    if refused:
        raise ValueError(refused)
    w = words(key, x) if words is not None else None
    kept = torch.where(della_keep(x, density, epsilon, key=key, words=w), x, torch.zeros_like(x))
    return rescale_l1(x, kept) if rescale else kept


def elect_sign(terms: Sequence[torch.Tensor], weights: Sequence[float], method: str = "total") -> torch.Tensor:
    """+1 where Σ w_i·τ̃_i (``total``), Σ τ̃_i (``sum``: the weights ignored, SCE's election) or Σ sign(τ̃_i)
    (``frequency``) is ≥ 0, else −1 (float32)."""
    import torch

    if method not in ("total", "sum", "frequency"):
        raise ValueError(f"unknown sign method {method!r}")
    s = torch.zeros(terms[0].shape, dtype=torch.float32, device=terms[0].device)
    for t, w in zip(terms, weights, strict=True):
        x = t.float()
        if method == "total":
            x = torch.tensor(w, dtype=torch.float32, device=x.device) * x
        s = s + (torch.sign(x) if method == "frequency" else x)
    return torch.where(s >= 0, 1.0, -1.0).to(torch.float32)


def disjoint_merge(
    terms: Sequence[torch.Tensor],
    weights: Sequence[float],
    sign: torch.Tensor | None = None,
    *,
    weighted_agreement: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """δ = Σ w_i·m_i·τ̃_i and the normaliser Σ w_i·m_i, with m_i = [sign(τ̃_i) = sign] (all ones without sign).

    ``weighted_agreement``: m_i = [sign(w_i·τ̃_i) = sign] instead (mergekit's rule; the same unless w_i < 0).
    """
    import torch

    d = torch.zeros(terms[0].shape, dtype=torch.float32, device=terms[0].device)
    den = torch.zeros_like(d)
    for t, w in zip(terms, weights, strict=True):
        x = t.float()
        wt = torch.tensor(w, dtype=torch.float32, device=x.device)
        if sign is None:
            d = d + wt * x
            den = den + wt
        else:
            y = wt * x if weighted_agreement else x
            agree = torch.where(sign > 0, y > 0, y < 0)
            d = d + torch.where(agree, wt * x, torch.zeros_like(x))
            den = den + torch.where(agree, wt, torch.zeros_like(x))
    return d, den


def combine(
    terms: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign: str = "none",
    normalize: bool = False,
    floor: float = 0.0,
) -> torch.Tensor:
    """Steps 2–3: elect signs (``none``/``total``/``sum``/``frequency``), combine, optionally normalize: divide by
    Σ w_i·m_i where it is > 0, or, with ``floor`` > 0, by max(Σ w_i·m_i, floor) (SCE's 1e-6)."""
    import torch

    elected = None if sign == "none" else elect_sign(terms, weights, sign)
    d, den = disjoint_merge(terms, weights, elected)
    if floor > 0:
        d = d / den.clamp(min=floor)
    elif normalize:
        d = torch.where(den > 0, d / torch.where(den > 0, den, torch.ones_like(den)), d)
    return d


def merge(
    base: torch.Tensor,
    terms: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    alpha: float = 1.0,
    sign: str = "none",
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ + α·combine(τ̃) in float32, rounded once to ``out_dtype`` (default: the base dtype). Terms already pruned."""
    import torch

    weights = [1.0] * len(terms) if weights is None else list(weights)
    x = base.float()
    if terms:
        d = combine(terms, weights, sign=sign, normalize=normalize)
        x = x + torch.tensor(alpha, dtype=torch.float32, device=x.device) * d
    return x.to(out_dtype or base.dtype)
