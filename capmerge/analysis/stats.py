"""``capmerge.inspect``: what a checkpoint or vector holds, and how two vectors relate — in one streaming pass.

For every input: its header (kind, provenance, fingerprint), tensor and parameter counts, dtypes and size on disk —
reading no tensor data. Then, unless ``headers_only``, one pass over the data, block by block (memory stays at a few
blocks whatever the tensor sizes; sums in float64), gives per tensor and per layer / module:

* ``l2`` — the Frobenius norm; ``share`` — the tensor's share of the total squared norm (shares sum to 1);
* ``mean_abs``, ``zero_frac``, ``max_abs``, ``nonfinite`` (count of NaN/Inf);
* with ``spectrum``, for 2-D tensors, the top-k singular values (randomized SVD above 256 rows and columns),
  the energy they capture, the stable rank ‖M‖²_F/σ₁² and ``rank90``, the number of singular values holding 90 % of
  the energy (None when more than k are needed).

Compressed vectors (low-rank, sparse, LoRA adapters and τ of two adapters) are read through their dense view τ̂, one
tensor rebuilt at a time: the statistics are those of τ̂ (``dense_view_of`` says so), and each input's header record
holds
:func:`capmerge.io.compression_record.compression_info` (kind, ranks / nnz, size ratio, recorded error and cosine).

Comparisons: ``against`` (every path compared with one vector) or ``task=(P, S), capability=(S, A)``, which builds
τ_task = S − P and τ_cap = A − S on the fly (nothing written) and compares them: per tensor, layer, module and in
total, ``cos`` = ⟨a, b⟩ / (‖a‖‖b‖) and ``ratio`` = ‖a‖ / ‖b‖. A tensor that one vector lacks counts as zero there
(vectors leave all-zero tensors out) and is listed in ``only_in_a`` / ``only_in_b``. In a difference built on the fly,
a tensor only one side has counts as zero on the other when that side is a vector (e.g. a module only one of two LoRA
adapters targets); between two models it is skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from capmerge._version import __version__
from capmerge.errors import MismatchError, UsageError
from capmerge.io.checkpoint import Checkpoint, TensorInfo
from capmerge.io.compression_record import compression_info
from capmerge.io.open import open_checkpoint
from capmerge.merge.masks import BLOCK_CONTAINERS, PatternLike, layer_index

PathLike = str | os.PathLike[str]
CHUNK = 1 << 20  # elements per block read: 4 MiB of float32 per input
BY = ("layer", "tensor", "module")
SPECTRUM_K = 32
_EXACT_SVD_DIM = 256  # below this many rows or columns the exact SVD is cheap


def module_of(name: str, pattern: PatternLike | None = None) -> str:
    """The module a tensor belongs to, across blocks: ``model.layers.3.mlp.up.weight`` → ``model.layers.*.mlp.up``."""
    parts = name.split(".")
    index = layer_index(name, pattern)
    if index is not None:
        for i in range(1, len(parts)):
            if parts[i] == str(index) and (pattern is not None or parts[i - 1] in BLOCK_CONTAINERS):
                parts[i] = "*"
                break
    return ".".join(parts[:-1]) if len(parts) > 1 else name


@dataclass
class Acc:
    """Running statistics of one tensor or group (float64 sums)."""

    numel: int = 0
    tensors: int = 0
    sumsq: float = 0.0
    sumabs: float = 0.0
    zeros: int = 0
    nonfinite: int = 0
    maxabs: float = 0.0

    def add(self, x: Any, x64: Any) -> None:
        """Add a block: the same 1-D values as float32 (``x``, for exact counts and max) and float64 (sums)."""
        import torch

        n = int(x64.numel())
        if n == 0:
            return
        sumsq = float(torch.dot(x64, x64))
        self.numel += n
        if not math.isfinite(sumsq):  # NaN/Inf in the block: count them, take statistics over the rest
            finite = torch.isfinite(x64)
            self.nonfinite += n - int(finite.sum())
            x, x64 = x[finite], x64[finite]
            sumsq = float(torch.dot(x64, x64))
        self.sumsq += sumsq
        self.sumabs += float(torch.linalg.vector_norm(x64, 1))
        self.zeros += int(x.numel()) - int(torch.count_nonzero(x))
        if x.numel():
            self.maxabs = max(self.maxabs, float(torch.linalg.vector_norm(x, math.inf)))

    def merge(self, o: Acc) -> None:
        self.numel += o.numel
        self.tensors += o.tensors
        self.sumsq += o.sumsq
        self.sumabs += o.sumabs
        self.zeros += o.zeros
        self.nonfinite += o.nonfinite
        self.maxabs = max(self.maxabs, o.maxabs)

    def to_dict(self, total_sumsq: float) -> dict[str, Any]:
        n = self.numel
        return {
            "tensors": self.tensors,
            "numel": n,
            "l2": math.sqrt(self.sumsq),
            "share": self.sumsq / total_sumsq if total_sumsq > 0 else 0.0,
            "mean_abs": self.sumabs / n if n else 0.0,
            "zero_frac": self.zeros / n if n else 0.0,
            "max_abs": self.maxabs,
            "nonfinite": self.nonfinite,
        }


@dataclass
class PairAcc:
    """Running ⟨a, b⟩, ‖a‖², ‖b‖² of two vectors (float64)."""

    dot: float = 0.0
    aa: float = 0.0
    bb: float = 0.0

    def add(self, a64: Any | None, b64: Any | None) -> None:
        """Add a block of each vector (1-D float64 tensors; None where the vector lacks the tensor)."""
        import torch

        if a64 is not None:
            self.aa += float(torch.dot(a64, a64))
        if b64 is not None:
            self.bb += float(torch.dot(b64, b64))
        if a64 is not None and b64 is not None:
            self.dot += float(torch.dot(a64, b64))

    def merge(self, o: PairAcc) -> None:
        self.dot += o.dot
        self.aa += o.aa
        self.bb += o.bb

    def to_dict(self) -> dict[str, Any]:
        na, nb = math.sqrt(self.aa), math.sqrt(self.bb)
        cos = self.dot / (na * nb) if na > 0 and nb > 0 else None
        if cos is not None:
            cos = max(-1.0, min(1.0, cos))
        return {"cos": cos, "norm_a": na, "norm_b": nb, "ratio": na / nb if nb > 0 else None}


@dataclass
class Vector:
    """A vector to analyse: a checkpoint as it is, or a difference of two checkpoints (A − B) built on the fly."""

    label: str
    plus: Checkpoint
    minus: Checkpoint | None = None
    formula: str | None = None
    compression: dict[str, Any] | None = None  # compression_info of ``plus`` (single compressed vectors only)
    tensors: dict[str, Acc] = field(default_factory=dict)
    spectra: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def infos(self, name: str) -> list[tuple[Checkpoint, TensorInfo, float]] | None:
        """The (checkpoint, tensor, sign) terms of ``name``, or None when this vector has no such (float) tensor."""
        ia = self.plus.tensors.get(name)
        if ia is None:
            ib = self.minus.tensors.get(name) if self.minus is not None and _is_vector(self.plus) else None
            return [(self.minus, ib, -1.0)] if ib is not None and ib.is_float else None  # type: ignore[list-item]
        if not ia.is_float:
            self.skipped[name] = f"non-floating ({ia.dtype})"
            return None
        if self.minus is None:
            return [(self.plus, ia, 1.0)]
        ib = self.minus.tensors.get(name)
        if ib is None and _is_vector(self.minus):  # e.g. a module only one of two LoRA adapters targets: ΔW = 0
            return [(self.plus, ia, 1.0)]
        if ib is None:
            self.skipped[name] = f"only in {self.plus.ref}"
            return None
        if not ib.is_float:
            raise MismatchError(
                f"dtype mismatch: {ib.dtype} in {self.minus.ref} vs {ia.dtype} in {self.plus.ref}", name
            )
        if ia.shape != ib.shape:
            raise MismatchError(
                f"shape mismatch: {list(ib.shape)} in {self.minus.ref} vs {list(ia.shape)} in {self.plus.ref}", name
            )
        return [(self.plus, ia, 1.0), (self.minus, ib, -1.0)]

    def names(self) -> list[str]:
        names = list(self.plus.tensors)
        if self.minus is not None:
            for n, i in self.minus.tensors.items():
                if n not in self.plus.tensors and i.is_float:
                    if _is_vector(self.plus):
                        names.append(n)
                    else:
                        self.skipped[n] = f"only in {self.minus.ref}"
        return names


def _is_vector(ck: Checkpoint) -> bool:
    """A vector (compressed, LoRA, or a capmerge difference) leaves out tensors that are zero; a model does not."""
    return ck.kind != "dense" or ck.metadata.get("capmerge.kind") in ("capability-vector", "lora-adapter")


def header_info(ck: Checkpoint) -> dict[str, Any]:
    """What a checkpoint's headers say, reading no tensor data."""
    dtypes: dict[str, dict[str, int]] = {}
    params = 0
    for info in ck.tensors.values():
        d = dtypes.setdefault(info.dtype, {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += info.numel
        d["bytes"] += info.nbytes
        params += info.numel
    size = sum(os.path.getsize(f) for f in ck.files if os.path.isfile(f))
    meta = dict(ck.metadata)
    info: dict[str, Any] = {
        "ref": ck.ref,
        # what the file is, from its header (capmerge.kind: capability-vector, merged, lora-adapter; "checkpoint"
        # for files capmerge did not write) and how its tensors are stored (dense, lowrank, sparse)
        "kind": meta.get("capmerge.kind") or ("merged" if "capmerge.merge" in meta else "checkpoint"),
        "storage": getattr(ck, "kind", None) or "dense",
        "files": list(ck.files),
        "sharded": ck.sharded,
        "size_on_disk": size,
        "tensor_bytes": ck.nbytes,
        "tensors": len(ck.tensors),
        "params": params,
        "dtypes": dict(sorted(dtypes.items())),
        "fingerprint": ck.fingerprint(),
        "metadata": meta,
    }
    # Compressed vectors (low-rank, sparse, LoRA): how they are stored and how close they are to what they stand for.
    info["compression"] = compression_info(ck)
    return info


def _spectrum(m: Any, k: int) -> dict[str, Any]:
    """Top-k singular values of a 2-D float32 matrix and what they capture."""
    import torch

    rows, cols = m.shape
    fro2 = float(m.double().square().sum())
    k = min(k, rows, cols)
    if not math.isfinite(fro2):  # NaN/Inf entries: no singular values (the SVD would not converge)
        return {"k": k, "sigma": [], "energy_top_k": None, "stable_rank": None, "rank90": None, "exact": True,
                "nonfinite": True}  # fmt: skip
    if k == 0 or fro2 == 0.0:
        return _summary(torch.zeros(0), fro2, k, True)
    exact = min(rows, cols) <= _EXACT_SVD_DIM
    if exact:
        s = torch.linalg.svdvals(m.double())[:k]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # deterministic range finder
            _, s, _ = torch.svd_lowrank(m, q=min(k + 10, rows, cols), niter=4)
        s = s[:k].double()
    return _summary(s, fro2, k, exact)


def _structured(t: list[tuple[Checkpoint, TensorInfo, float]] | None, shape: tuple[int, ...]) -> Any:
    """The block source of a low-rank or sparse tensor too large to build whole (more than a block), whose spectrum
    comes from its stored parts instead; None otherwise."""
    from capmerge.io.lazy import BLOCK_ELEMS

    if t is None or len(t) != 1 or len(shape) != 2 or math.prod(shape) <= BLOCK_ELEMS:
        return None
    ck, info, _ = t[0]
    opener = getattr(ck, "blocks", {}).get(info.name)
    src = opener() if opener is not None else None
    return src if hasattr(src, "singular_values") else None


def _summary(s: Any, fro2: float, k: int, exact: bool) -> dict[str, Any]:
    """What the top-k singular values ``s`` (float64, descending) of a matrix of squared norm ``fro2`` capture."""
    import torch

    s = torch.cat([s[:k].double(), torch.zeros(max(0, k - s.numel()), dtype=torch.float64)])
    if k == 0 or fro2 == 0.0:
        return {"k": k, "sigma": [], "energy_top_k": 0.0, "stable_rank": 0.0, "rank90": 0 if fro2 == 0 else None,
                "exact": True}  # fmt: skip
    energy = (s.square().cumsum(0) / fro2).clamp(max=1.0)
    above = (energy >= 0.9).nonzero()
    return {
        "k": k,
        "sigma": [float(v) for v in s],
        "energy_top_k": float(energy[-1]),
        "stable_rank": fro2 / float(s[0]) ** 2 if float(s[0]) > 0 else None,  # σ₁ underflows for subnormal entries
        "rank90": int(above[0]) + 1 if len(above) else None,
        "exact": exact,
    }


def _open_all(refs: Iterable[PathLike | Checkpoint], headers_only: bool = False) -> dict[str, Checkpoint]:
    """Open each distinct reference once (so S in ``--task P S --capability S A`` is read once per block)."""
    opened: dict[str, Checkpoint] = {}
    for r in refs:
        key = r.ref if isinstance(r, Checkpoint) else os.fspath(r)
        if key not in opened:
            opened[key] = open_checkpoint(r, headers_only=headers_only)
    return opened


def _key(r: PathLike | Checkpoint) -> str:
    return r.ref if isinstance(r, Checkpoint) else os.fspath(r)


def _pair(x: Any, what: str) -> tuple[Any, Any]:
    if isinstance(x, str | os.PathLike) or len(x) != 2:
        raise UsageError(f"{what} takes two checkpoints, got {x!r}")
    return x[0], x[1]


def inspect(
    paths: Sequence[PathLike | Checkpoint] | PathLike | Checkpoint = (),
    *,
    against: PathLike | Checkpoint | None = None,
    task: Sequence[PathLike | Checkpoint] | None = None,
    capability: Sequence[PathLike | Checkpoint] | None = None,
    by: str = "layer",
    spectrum: bool = False,
    headers_only: bool = False,
    spectrum_k: int = SPECTRUM_K,
    layer_pattern: PatternLike | None = None,
) -> dict[str, Any]:
    """Describe checkpoints / vectors and compare them (the dict ``capmerge inspect --json`` prints).

    Args:
        paths: checkpoints or vectors (any reference :func:`capmerge.open_checkpoint` accepts).
        against: compare every path with this vector (cosine and norm ratio per tensor, layer, module, total).
        task: ``(P, S)``: the task vector S − P, built on the fly; needs ``capability``.
        capability: ``(S, A)``: the capability vector A − S, built on the fly and compared with the task vector.
        by: how the terminal table groups rows (``layer``, ``tensor`` or ``module``); the dict holds all three.
        spectrum: also compute the top singular values of 2-D tensors (randomized SVD for large ones).
        headers_only: stop after the headers: read no tensor data.
        spectrum_k: how many singular values ``spectrum`` computes per tensor.
        layer_pattern: a regex whose first group is the block index (default: :func:`capmerge.merge.masks.layer_index`).

    Returns:
        ``{"capmerge_version", "by", "inputs": [header info...], "vectors": [stats...], "comparisons": [...]}``;
        ``vectors`` and ``comparisons`` are absent with ``headers_only``.

    Raises:
        UsageError: on conflicting or missing arguments. CheckpointError / MismatchError: on unreadable inputs or
            tensors whose shapes differ between vectors.
    """
    if by not in BY:
        raise UsageError(f"invalid by {by!r} (choose from {', '.join(BY)})")
    if isinstance(paths, str | os.PathLike | Checkpoint):
        paths = [paths]
    paths = list(paths)
    if (task is None) != (capability is None):
        raise UsageError("--task P S and --capability S A go together")
    if task is not None and (paths or against is not None):
        raise UsageError("--task/--capability build both vectors; give no other PATH or --against")
    if task is None and not paths:
        raise UsageError("nothing to inspect (give PATH... or --task P S --capability S A)")
    if spectrum_k < 1:
        raise UsageError(f"spectrum_k must be at least 1, got {spectrum_k}")
    if layer_pattern is not None:
        layer_index("", layer_pattern)  # validates the regex up front
    refs: list[Any]
    if task is not None:
        tp, ts = _pair(task, "--task")
        cs, ca = _pair(capability, "--capability")
        refs = [tp, ts, cs, ca]
    else:
        refs = [*paths, *([against] if against is not None else [])]
    opened = _open_all(refs, headers_only)
    try:
        result: dict[str, Any] = {
            "capmerge_version": __version__,
            "by": by,
            "inputs": [header_info(ck) for ck in opened.values()],
        }
        comp_of = {key: inp["compression"] for key, inp in zip(opened, result["inputs"], strict=True)}
        if headers_only:
            return result
        if task is not None:
            p, s1, s2, a = (opened[_key(r)] for r in refs)
            vectors = [
                Vector(f"capability ({a.ref} − {s2.ref})", a, s2, formula="A − S"),
                Vector(f"task ({s1.ref} − {p.ref})", s1, p, formula="S − P"),
            ]
            pairs = [(0, 1)]
        else:
            vectors = [Vector(_key(r), opened[_key(r)], compression=comp_of[_key(r)]) for r in paths]
            if against is not None:
                vectors.append(Vector(_key(against), opened[_key(against)], compression=comp_of[_key(against)]))
                pairs = [(i, len(vectors) - 1) for i in range(len(paths))]
            else:
                pairs = []
        comps = _stream(vectors, pairs, spectrum, spectrum_k)
        result["vectors"] = [_vector_dict(v, layer_pattern) for v in vectors]
        if pairs:
            result["comparisons"] = [_comparison_dict(vectors[i], vectors[j], comps[k], layer_pattern)
                                     for k, (i, j) in enumerate(pairs)]  # fmt: skip
        return result
    finally:
        for ck in opened.values():
            ck.close()


def _stream(
    vectors: list[Vector], pairs: list[tuple[int, int]], spectrum: bool, k: int
) -> list[dict[str, PairAcc | list[str]]]:
    """One pass over all tensor names: each (checkpoint, tensor) block is read once and shared by the vectors."""
    import torch

    from capmerge._torch import as_tensor

    names: list[str] = []
    seen: set[str] = set()
    for v in vectors:
        for n in v.names():
            if n not in seen:
                seen.add(n)
                names.append(n)
    comps: list[dict[str, Any]] = [{"tensors": {}, "only_a": [], "only_b": []} for _ in pairs]
    bufs: dict[int, bytearray] = {}
    for name in names:
        terms = [v.infos(name) for v in vectors]
        present = [t for t in terms if t is not None]
        if not present:
            continue
        shape = present[0][0][1].shape
        for v, t in zip(vectors, terms, strict=True):
            if t is not None and t[0][1].shape != shape:
                raise MismatchError(f"shape mismatch: {list(t[0][1].shape)} in {v.label} vs {list(shape)}", name)
        n = math.prod(shape)
        accs = [Acc(tensors=1) if t is not None else None for t in terms]
        paccs = [PairAcc() if terms[i] is not None or terms[j] is not None else None for i, j in pairs]
        # the spectrum of a large low-rank or sparse tensor comes from its stored parts, not from the whole matrix
        structured = [_structured(t, shape) if spectrum else None for t in terms]
        full = [torch.empty(n, dtype=torch.float32) if spectrum and len(shape) == 2 and t is not None and st is None
                else None for t, st in zip(terms, structured, strict=True)]  # fmt: skip
        for off in range(0, n, CHUNK):
            m = min(CHUNK, n - off)
            blocks: dict[tuple[int, str], Any] = {}
            values: list[Any] = []
            for t in terms:
                if t is None:
                    values.append(None)
                    continue
                x = None
                for ck, info, sign in t:
                    key = (id(ck), info.name)
                    b = blocks.get(key)
                    if b is None:
                        buf = bufs.setdefault(id(ck), bytearray(CHUNK * 8))
                        view = memoryview(buf)[: m * info.itemsize]
                        ck.read_into(info, off * info.itemsize, view)
                        # float() may alias the buffer (F32): valid for this block only, as it is used
                        b = as_tensor(view, info.dtype).float()
                        blocks[key] = b
                    x = (b if sign > 0 else -b) if x is None else (x + b if sign > 0 else x - b)
                values.append(x)
            values64 = [None if x is None else x.double() for x in values]  # sums in float64
            for i, x in enumerate(values):
                if x is not None:
                    accs[i].add(x, values64[i])  # type: ignore[union-attr]
                    if full[i] is not None:
                        full[i][off : off + m] = x
            for pi, (i, j) in enumerate(pairs):
                if paccs[pi] is not None:
                    paccs[pi].add(values64[i], values64[j])  # type: ignore[union-attr]
        for v, acc, f, st in zip(vectors, accs, full, structured, strict=True):
            if acc is not None:
                v.tensors[name] = acc
                if f is not None:
                    v.spectra[name] = _spectrum(f.view(shape), k)
                elif st is not None:
                    kk = min(k, *shape)
                    sv, fro2, exact = st.singular_values(shape[0], shape[1], kk)
                    v.spectra[name] = _summary(sv, fro2, kk, exact)
        for pi, (i, j) in enumerate(pairs):
            if paccs[pi] is None:
                continue
            comps[pi]["tensors"][name] = paccs[pi]
            if terms[i] is None:
                comps[pi]["only_b"].append(name)
            elif terms[j] is None:
                comps[pi]["only_a"].append(name)
    return comps


def _groups(names: Iterable[str], pattern: PatternLike | None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    layers: dict[int, list[str]] = {}
    other: list[str] = []
    modules: dict[str, list[str]] = {}
    for n in names:
        idx = layer_index(n, pattern)
        if idx is None:
            other.append(n)
        else:
            layers.setdefault(idx, []).append(n)
        modules.setdefault(module_of(n, pattern), []).append(n)
    by_layer = {str(i): layers[i] for i in sorted(layers)}
    if other:
        by_layer["other"] = other
    return by_layer, modules


def _vector_dict(v: Vector, pattern: PatternLike | None) -> dict[str, Any]:
    total = Acc()
    for a in v.tensors.values():
        total.merge(a)
    tot2 = total.sumsq
    tensors = []
    for name, a in v.tensors.items():
        info = v.plus.tensors.get(name) or v.minus.tensors[name]  # type: ignore[union-attr]
        d = {"name": name, "layer": layer_index(name, pattern), "module": module_of(name, pattern),
             "shape": list(info.shape), "dtype": info.dtype, **a.to_dict(tot2)}  # fmt: skip
        del d["tensors"]
        if name in v.spectra:
            d["spectrum"] = v.spectra[name]
        if v.compression is not None:
            d["compression"] = {k: x for k, x in v.compression["tensors"][name].items() if not k.startswith("bytes")}
        tensors.append(d)
    by_layer, by_module = _groups(v.tensors, pattern)

    def agg(groups: dict[str, list[str]]) -> list[dict[str, Any]]:
        rows = []
        for g, members in groups.items():
            acc = Acc()
            for n in members:
                acc.merge(v.tensors[n])
            rows.append({"name": g, **acc.to_dict(tot2)})
        return rows

    # Statistics of a compressed vector are of its dense view τ̂ (B·A, or the scattered sparse entries), rebuilt one
    # tensor at a time; this says which stored kinds the view was built from (None: all dense).
    kinds = [c.kind for c in (v.plus, v.minus) if c is not None]
    out = {
        "label": v.label,
        "ref": v.plus.ref if v.minus is None else None,
        "formula": None if v.minus is None else {"plus": v.plus.ref, "minus": v.minus.ref},
        "dense_view_of": None if all(k == "dense" for k in kinds) else " − ".join(kinds),
        "total": total.to_dict(tot2),
        "tensors": tensors,
        "layers": agg(by_layer),
        "modules": agg(by_module),
        "skipped": dict(v.skipped),
    }
    return out


def _comparison_dict(a: Vector, b: Vector, comp: dict[str, Any], pattern: PatternLike | None) -> dict[str, Any]:
    accs: dict[str, PairAcc] = comp["tensors"]
    total = PairAcc()
    for p in accs.values():
        total.merge(p)
    by_layer, by_module = _groups(accs, pattern)

    def agg(groups: dict[str, list[str]]) -> list[dict[str, Any]]:
        rows = []
        for g, members in groups.items():
            acc = PairAcc()
            for n in members:
                acc.merge(accs[n])
            rows.append({"name": g, **acc.to_dict()})
        return rows

    return {
        "a": a.label,
        "b": b.label,
        "total": total.to_dict(),
        "tensors": [{"name": n, "layer": layer_index(n, pattern), **p.to_dict()} for n, p in accs.items()],
        "layers": agg(by_layer),
        "modules": agg(by_module),
        "only_in_a": comp["only_a"],
        "only_in_b": comp["only_b"],
    }
