"""``capmerge.apply``: θ_out = θ + α·δ over one or many vectors, with pruning, sign election, masks and sweeps.

All through the one streaming loop: each input tensor is read once (twice for magnitude thresholds: a histogram pass
and the merge pass), whatever the number of outputs of an α / density sweep.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capmerge._version import __version__
from capmerge.errors import MismatchError, UsageError
from capmerge.io.checkpoint import Checkpoint, PathLike, TensorInfo, parse_dtype
from capmerge.io.names import name_mismatch, normalise
from capmerge.io.open import open_checkpoint
from capmerge.io.writer import Output, finish_files
from capmerge.merge.engine import Job, Sink, run
from capmerge.merge.masks import TensorMask, check_template, count_layers, expand_template
from capmerge.merge.methods import MergeOptions, resolve
from capmerge.merge.options import ApplyOptions, as_list
from capmerge.merge.overrides import Overrides
from capmerge.merge.plan import Term, merge_job
from capmerge.merge.summary import Summary, input_ref, start_progress


def safetensors_name(name: str) -> str:
    """The output name of a base weight file: outputs are always safetensors (``pytorch_model-00001-of-00002.bin``
    → ``model-00001-of-00002.safetensors``, ``pytorch_model.bin.index.json`` → ``model.safetensors.index.json``)."""
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        if name.endswith(suffix + ".index.json"):
            return name[: -len(suffix + ".index.json")].replace("pytorch_model", "model") + ".safetensors.index.json"
        if name.endswith(suffix):
            return name[: -len(suffix)].replace("pytorch_model", "model") + ".safetensors"
    return name


def build_terms(
    base: Checkpoint,
    vectors: Sequence[PathLike | Checkpoint],
    add: Sequence[PathLike | Checkpoint],
    sub: Sequence[PathLike | Checkpoint],
    weights: Sequence[float] | float | None,
    *,
    rename: Sequence[str] | str | None = None,
    opts: dict[str, Any] | None = None,
) -> tuple[Checkpoint, list[Term], list[str], dict[str, str]]:
    """Vectors (τ files) first, then ``--add``/``--sub`` pairs (τ = A − S; A − BASE when no ``--sub`` is given).

    Returns the base and the terms as views whose names pair with the base's (:func:`capmerge.io.names.normalise`),
    the notes on what was renamed, and the tied weights. LoRA adapters' full weights are bound to the base.
    """
    if sub and len(sub) != len(add):
        raise UsageError(f"--sub given {len(sub)} times but --add {len(add)} times (they pair up in order)")
    opts = opts or {}
    cks = [open_checkpoint(v, **opts) for v in [*vectors, *add, *sub]]
    if not cks:
        raise UsageError("no vectors given (pass VECTOR files or --add/--sub checkpoints)")
    # the models (BASE, --add/--sub) read a head they tie as their embedding; a vector without a head changes none
    models = [True] + [False] * len(vectors) + [True] * (len(add) + len(sub or ()))
    base, cks, notes, ties = normalise(base, cks, rename=rename, labels=["BASE", *(c.ref for c in cks)], models=models)
    cks = [c.with_base(base) if getattr(c, "full", None) else c for c in cks]  # type: ignore[attr-defined]
    nv, na = len(vectors), len(add)
    terms = [Term(c, label=str(getattr(v, "ref", v))) for c, v in zip(cks[:nv], vectors, strict=True)]
    for i in range(na):
        ca = cks[nv + i]
        cb = cks[nv + na + i] if sub else base
        terms.append(Term(ca, cb, label=f"{ca.ref} - {cb.ref}"))
    if isinstance(weights, int | float):  # one weight for every vector
        weights = [float(weights)] * len(terms)
    if weights is not None:
        if len(weights) != len(terms):
            raise UsageError(f"--weights has {len(weights)} values for {len(terms)} vectors")
        for t, w in zip(terms, weights, strict=True):
            t.weight = float(w)
    notes[:0] = [n for c in [base, *cks] for n in getattr(c, "notes", [])]
    return base, terms, notes, ties


def _check_names(base: Checkpoint, terms: list[Term], allow_missing: bool, skipped: dict[str, str]) -> None:
    for t in terms:
        sides = [t.a] if t.b is None else [t.a, t.b]
        if t.b is not None and t.b is not base:
            fa = {n for n, i in t.a.tensors.items() if i.is_float}
            fb = {n for n, i in t.b.tensors.items() if i.is_float}
            if fa != fb and not allow_missing:
                raise MismatchError(
                    name_mismatch(sorted(fa - fb), t.a.ref, sorted(fb - fa), t.b.ref) + "; use --allow-missing",
                    t.label,
                )
        for ck in sides:
            missing = [n for n, i in ck.tensors.items() if n not in base.tensors and i.is_float]
            if missing and not allow_missing:
                raise MismatchError(name_mismatch(missing, "the vector", [], "") + "; use --allow-missing", ck.ref)
            for n in missing:
                skipped[n] = f"not in BASE ({ck.ref})"


def apply(
    base: PathLike | Checkpoint,
    vectors: Sequence[PathLike | Checkpoint] | PathLike | Checkpoint = (),
    output: PathLike | None = None,
    *,
    alpha: float | Sequence[float] = 1.0,
    dtype: str | None = None,
    method: str | None = None,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    gamma: float | None = None,
    sign: str | None = None,
    normalize: bool | None = None,
    rescale: bool | None = None,
    seed: int | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    layers: str | None = None,
    layer_pattern: str | None = None,
    alpha_gradient: Sequence[float] | None = None,
    overrides: Any = None,
    add: Sequence[PathLike | Checkpoint] | PathLike | None = None,
    sub: Sequence[PathLike | Checkpoint] | PathLike | None = None,
    allow_missing: bool = False,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str = "auto",
    rename: Sequence[str] | str | None = None,
    key: str | None = None,
    trust_pickle: bool = False,
    allow_model_as_vector: bool = False,
) -> Summary:
    """Merge vectors into ``base``: θ_out = θ + α·δ (formulas in :mod:`capmerge.functional`).

    Args:
        base: the checkpoint to merge into (e.g. the pretrained model).
        vectors: capability vectors τ_i (any checkpoint reference).
        output: a ``.safetensors`` file or a directory mirroring the base. With several α (or swept densities) a
            template containing ``{alpha}`` (``{density}``): one output per value, from one pass over the inputs.
        alpha: the global scale α, or a list for a sweep.
        dtype: output dtype of floating tensors (default: each base tensor's).
        method: a preset (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
            ``breadcrumbs_ties``, ``magnitude``); the options below override it.
        weights: one weight w_i per vector (default 1).
        density: one density for all vectors, one per vector, or — with ``{density}`` in ``output`` — a sweep.
        gamma / sign / normalize / rescale / seed: pruning and election options (see :mod:`capmerge.merge.methods`).
        include / exclude / layers / layer_pattern: which tensors are merged; the others are copied bit-exactly.
        alpha_gradient: per-layer α interpolated linearly over the block index (tensors outside blocks use α).
        overrides: per-tensor parameters (:mod:`capmerge.merge.overrides`): a list of ``"REGEX:key=value,..."`` strings,
            ``{"filter": REGEX, "alpha": ..., "weight": ..., "density": ..., "gamma": ...}`` mappings or
            ``(REGEX, {...})`` pairs; for each tensor and parameter the first matching override that sets it wins;
            an overridden α or density is pinned across a sweep. Overrides that change nothing are reported in
            ``Summary.warnings``.
        add / sub: three-checkpoint form, τ_j = add_j − sub_j (add_j − base without ``sub``), computed on the fly.
        allow_missing / force / allow_nonfinite / progress / device / rename / key / trust_pickle: as in
            :func:`capmerge.diff` (vector names are paired with the base's; the output keeps the base's names).
        allow_model_as_vector: add a checkpoint of ``vectors`` that is evidently a whole model as it is, instead
            of refusing it (:mod:`capmerge.merge.vectorcheck`; a model belongs in ``add``, which takes
            τ = model − base); integer buffers of vectors (a model's position ids) are then left out, as for ``add``.

    Raises:
        ModelAsVectorError: a checkpoint of ``vectors`` is evidently a model (before anything is written).

    Returns:
        A :class:`~capmerge.merge.summary.Summary`; ``outputs`` lists every output of a sweep.
    """
    opts = ApplyOptions(
        alpha=alpha,
        dtype=dtype,
        method=method,
        weights=weights,
        density=density,
        gamma=gamma,
        sign=sign,
        normalize=normalize,
        rescale=rescale,
        seed=seed,
        include=include,
        exclude=exclude,
        layers=layers,
        layer_pattern=layer_pattern,
        alpha_gradient=alpha_gradient,
        overrides=overrides,
        add=add,
        sub=sub,
        allow_missing=allow_missing,
        force=force,
        allow_nonfinite=allow_nonfinite,
        device=device,
        rename=rename,
        key=key,
        trust_pickle=trust_pickle,
        allow_model_as_vector=allow_model_as_vector,
    )
    return run_apply(base, vectors, output, opts, progress=progress)


@dataclass
class _Merge:
    """A planned merge: the opened inputs, the resolved options and one job per base tensor."""

    base: Checkpoint
    terms: list[Term]
    opts: ApplyOptions
    out_tmpl: str
    code: str | None
    device: str
    summary: Summary
    ties: dict[str, str]
    options: MergeOptions = field(default_factory=MergeOptions)
    variants: list[tuple[float, ...]] = field(default_factory=list)
    mask: TensorMask = field(default_factory=TensorMask.build)
    ovr: Overrides = field(default_factory=lambda: Overrides.build(None))
    jobs: list[Job] = field(default_factory=list)
    shard_names: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.base.close()
        for t in self.terms:
            t.a.close()
            if t.b is not None and t.b is not self.base:
                t.b.close()


def run_apply(
    base: PathLike | Checkpoint,
    vectors: Sequence[PathLike | Checkpoint] | PathLike | Checkpoint,
    output: PathLike | None,
    opts: ApplyOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """:func:`apply` with its options gathered in one :class:`ApplyOptions` (what the CLI and recipes call)."""
    t0 = time.perf_counter()
    if output is None:
        raise UsageError("no output given")
    m = _open(base, vectors, os.fspath(output), opts)
    try:
        _plan(m)
        stats = _write(m, progress)
    finally:
        m.close()
    s = m.summary
    s.tensors_written, s.tensors_changed = stats.tensors_written, stats.tensors_computed
    s.tensors_unchanged, s.tensors_skipped = stats.tensors_copied, len(s.skipped)
    s.bytes_read, s.bytes_reread = stats.bytes_read, stats.bytes_reread
    s.seconds = time.perf_counter() - t0
    return s


def _open(base: PathLike | Checkpoint, vectors: Any, out_tmpl: str, opts: ApplyOptions) -> _Merge:
    """Open BASE and the vectors, pair their names, resolve the method, the sweep, the mask and the overrides."""
    from capmerge.kernels.device import resolve_device

    code = parse_dtype(opts.dtype, allow_auto=True)
    dev = resolve_device(opts.device)
    ck_b = open_checkpoint(base, **opts.open_opts)
    ck_b, terms, notes, ties = build_terms(ck_b, as_list(vectors), opts.add, opts.sub, opts.weights,
                                           rename=opts.rename, opts=opts.open_opts)  # fmt: skip
    m = _Merge(ck_b, terms, opts, out_tmpl, code, dev, Summary("apply", out_tmpl, notes=notes, tied=ties), ties)
    try:
        _resolve(m)
    except BaseException:
        m.close()
        raise
    return m


def _resolve(m: _Merge) -> None:
    o, alphas, dens_list = m.opts, m.opts.alpha, list(m.opts.density)
    density_sweep = "{density}" in m.out_tmpl
    check_template(m.out_tmpl, "alpha", list(alphas))
    check_template(m.out_tmpl, "density", dens_list if density_sweep else [0.0])
    m.options = resolve(
        o.method, prune=None, density=None if density_sweep or not dens_list else dens_list, gamma=o.gamma,
        sign=o.sign, normalize=o.normalize, rescale=o.rescale, seed=o.seed, n_vectors=len(m.terms),
    )  # fmt: skip
    if density_sweep:
        for d in dens_list:
            resolve(o.method, density=d)  # validates each swept value
        m.variants = [tuple(d for _ in m.terms) for d in dens_list or [1.0]]
    else:
        m.variants = [tuple(m.options.density_for(i) for i in range(len(m.terms)))]
    if o.alpha_gradient is not None and len(alphas) > 1:
        raise UsageError("--alpha-gradient cannot be combined with an --alpha sweep")
    m.mask = TensorMask.build(include=o.include, exclude=o.exclude, layers=o.layers, layer_pattern=o.layer_pattern)
    m.ovr = Overrides.build(o.overrides, n_vectors=len(m.terms), alpha_gradient=o.alpha_gradient)
    if not o.allow_model_as_vector:  # first: a model's other mismatches (names, buffers) would only mislead
        from capmerge.merge.vectorcheck import check_checkpoint

        for t in m.terms:
            if t.b is None:
                check_checkpoint(t.a, m.base)
    _check_names(m.base, m.terms, o.allow_missing, m.summary.skipped)


def _touching(m: _Merge, name: str, ib: TensorInfo) -> list[tuple[int, Term, TensorInfo, TensorInfo | None]] | None:
    """The terms that change base tensor ``name`` (None: skipped for a shape mismatch under --allow-missing)."""
    touching = []
    for ti, t in enumerate(m.terms):
        ia = t.a.tensors.get(name)
        ibb = t.b.tensors.get(name) if t.b is not None else None
        if ia is None or (t.b is not None and ibb is None):
            continue
        for info in (ia, ibb):
            if info is None:
                continue
            if info.shape != ib.shape:
                if not m.opts.allow_missing:
                    raise MismatchError(f"shape mismatch: {list(ib.shape)} in BASE vs {list(info.shape)} in "
                                        f"{t.label}", name)  # fmt: skip
                m.summary.skipped[name] = f"shape {list(info.shape)} in {t.label} vs {list(ib.shape)} in BASE"
                return None
            if not (info.is_float and ib.is_float):
                if (t.b is not None or m.opts.allow_model_as_vector) and not info.is_float and not ib.is_float:
                    break  # integer buffers of a checkpoint pair (or of a model added as is) are not part of τ
                raise MismatchError(f"cannot add a {info.dtype} vector tensor to a {ib.dtype} base tensor", name)
        else:
            touching.append((ti, t, ia, ibb))
    return touching


def _plan(m: _Merge) -> None:
    """One job per base tensor, in the base's order: a copy, a cast, or a merge with its resolved parameters."""
    o, alphas = m.opts, list(m.opts.alpha)
    n_layers = count_layers(m.base.tensors, o.layer_pattern) if m.ovr.needs_layers else 0
    single_file, sink_of, selected, resolved = m.out_tmpl.endswith(".safetensors"), {}, 0, []
    for name, ib in m.base.tensors.items():
        shard = safetensors_name(os.path.basename(ib.shard)) if m.base.root is not None else "model.safetensors"
        if shard not in sink_of:
            sink_of[shard] = len(m.shard_names)
            m.shard_names.append(shard)
        sink = 0 if single_file else sink_of[shard]
        touching = _touching(m, name, ib) or []
        is_selected = m.mask.selects(name)
        selected += bool(touching and is_selected)
        out_dtype = m.code if (m.code and ib.is_float) else ib.dtype
        if not touching or not is_selected:
            if out_dtype == ib.dtype:
                m.jobs.append(Job(name, "copy", ib.dtype, ib.shape, [(m.base, ib)], sink=sink))
            else:  # a pure cast (no terms)
                m.jobs.append(merge_job(name, (m.base, ib), [], out_code=out_dtype, options=m.options, variants=[()],
                                        alphas=[1.0] * len(alphas) * len(m.variants), sink=sink,
                                        device=m.device))  # fmt: skip
            continue
        p = m.ovr.resolve(name, n_layers=n_layers, layer_pattern=o.layer_pattern)
        resolved.append(p)
        # an overridden α (or the gradient's) and an overridden density are pinned: the same in every sweep output
        tensor_alphas = alphas if p.alpha is None else [p.alpha] * len(alphas)
        dens = p.per_vector("density", len(m.terms))
        t_variants = m.variants if dens is None else [dens] * len(m.variants)
        m.jobs.append(merge_job(name, (m.base, ib), touching, out_code=out_dtype, options=p.merge_options(m.options),
                                variants=t_variants, alphas=tensor_alphas, sink=sink, device=m.device,
                                weights=p.per_vector("weight", len(m.terms))))  # fmt: skip
    if not m.mask.is_trivial and selected == 0:  # the base's layers, for a --layers past them
        n = count_layers(m.base.tensors, o.layer_pattern)
        has = f"the base has layers 0-{n - 1}" if n else "the base has no numbered layers (see --layer-pattern)"
        raise UsageError(f"mask selects no tensors (check --include/--exclude/--layers; {has})")
    m.summary.warnings += m.ovr.unused(resolved)


def _write(m: _Merge, progress: Any) -> Any:
    """Open one output per sweep point, stream every job into all of them, finish their files and commit."""
    alphas = list(m.opts.alpha)
    paths = [expand_template(m.out_tmpl, alpha=a, density=v[0] if v else 1.0) for v in m.variants for a in alphas]
    if len(set(paths)) != len(paths):
        raise UsageError("the output template gives several outputs the same name")
    inputs = [m.base] + [c for t in m.terms for c in (t.a, t.b) if c is not None]
    outs: list[Output] = []
    try:
        for p in paths:
            outs.append(Output(p, inputs, force=m.opts.force))
        sinks = [Sink(_open_files(m, out)) for out in outs]
        start_progress(progress, m.jobs)
        stats = run(m.jobs, sinks, allow_nonfinite=m.opts.allow_nonfinite, progress=progress, device=m.device)
        for vi, v in enumerate(m.variants):
            for ai, a in enumerate(alphas):
                k = vi * len(alphas) + ai
                _finish_output(m, outs[k], sinks[k], v, a)
        for out in outs:
            out.commit()
    except BaseException:
        for out in outs:
            out.abort()
        raise
    m.summary.outputs = paths
    return stats


def _open_files(m: _Merge, out: Output) -> list[Any]:
    if out.single_file:
        return [out.open_file("", [(j.name, j.out_dtype, j.shape) for j in m.jobs])]
    return [out.open_file(s, [(j.name, j.out_dtype, j.shape) for j in m.jobs if j.sink == i])
            for i, s in enumerate(m.shard_names)]  # fmt: skip


def _finish_output(m: _Merge, out: Output, sink: Sink, densities: tuple[float, ...], alpha: float) -> None:
    """Headers (with the merge record), the index, the base's side files and ``capmerge.json`` of one output."""
    record = _record(m, densities, alpha)
    metadata = {
        **m.base.metadata,
        "format": "pt",
        "capmerge.kind": "merged",
        "capmerge.version": __version__,
        "capmerge.merge": json.dumps(record, separators=(",", ":")),
    }
    if m.ties:
        metadata["capmerge.tied"] = json.dumps(m.ties)
    names = [os.path.basename(out.out)] if out.single_file else m.shard_names
    index_name = None
    if not out.single_file and m.base.sharded:
        index_name = safetensors_name(os.path.basename(m.base.index_path or "model.safetensors.index.json"))
    written, nbytes = finish_files(out, list(zip(names, sink.files, strict=True)), metadata, index_name)
    if not out.single_file:
        if m.base.root:
            copied, not_copied = out.copy_non_weight_files(m.base.root)
            written += copied
            if getattr(m.base, "heads_untied", None) and "config.json" in copied:
                _untie_config(out, m.base.root)
            m.summary.files_skipped.update(not_copied)
        out.write_text("capmerge.json", json.dumps(record, indent=2) + "\n")
        written.append("capmerge.json")
    m.summary.files += written
    m.summary.bytes_written += nbytes


def _untie_config(out: Output, root: str) -> None:
    """The copied config.json with ``tie_word_embeddings`` false: BASE ties its head to its embeddings, a vector
    changes the head, so the output has a head of its own."""
    from capmerge.merge import model_side

    cfg = model_side.read_config(Path(root))
    if cfg is not None:
        model_side.untie(cfg)
        out.write_text("config.json", json.dumps(cfg, indent=2) + "\n")


def _record(m: _Merge, densities: tuple[float, ...], alpha: float) -> dict[str, Any]:
    """What ``capmerge.json`` (and the ``capmerge.merge`` header key) records: enough to reproduce the output."""
    vecs = []
    for i, t in enumerate(m.terms):
        v: dict[str, Any] = {**input_ref(t.a), "weight": t.weight, "density": densities[i] if densities else 1.0}
        if t.b is not None:
            v["minus"] = input_ref(t.b)
        vecs.append(v)
    o, opt = m.opts, m.options
    return {
        "capmerge_version": __version__,
        "command": "apply",
        "base": input_ref(m.base),
        "vectors": vecs,
        "alpha": alpha,
        "alpha_gradient": list(o.alpha_gradient) if o.alpha_gradient is not None else None,
        "method": opt.method,
        "options": {
            "prune": opt.prune,
            "gamma": opt.gamma,
            "sign": opt.sign,
            "normalize": opt.normalize,
            "rescale": opt.rescale,
            "seed": opt.seed,
        },  # fmt: skip
        "mask": None if m.mask.is_trivial else repr(m.mask),
        "dtype": o.dtype or "base",
        "allow_missing": o.allow_missing,
        "skipped": m.summary.skipped,
        "overrides": m.ovr.to_list() or None,
    }


def list_tensors(
    base: PathLike | Checkpoint,
    vectors: Sequence[PathLike | Checkpoint] | PathLike | Checkpoint = (),
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    layers: str | None = None,
    layer_pattern: str | None = None,
    add: Sequence[PathLike | Checkpoint] | PathLike | None = None,
    sub: Sequence[PathLike | Checkpoint] | PathLike | None = None,
    rename: Sequence[str] | str | None = None,
    key: str | None = None,
    trust_pickle: bool = False,
    alpha: float | Sequence[float] = 1.0,
    alpha_gradient: Sequence[float] | None = None,
    method: str | None = None,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    gamma: float | None = None,
    overrides: Any = None,
) -> dict[str, Any]:
    """Dry run of a merge's mask and name pairing: which base tensors would be merged, which copied, and under
    which name each vector holds them (``pairs``: base name → [(vector, its name)] where they differ) — from
    headers only.

    ``params`` gives each selected tensor's effective parameters — ``alpha`` (a list for a sweep), ``weights``,
    ``density`` (one per vector; a list per vector for a ``{density}`` sweep is not expanded: the global values),
    ``gamma`` and ``overrides`` (parameter → 1-based number of the override that set it); ``warnings`` lists
    overrides that change nothing."""
    opts = ApplyOptions(
        include=include,
        exclude=exclude,
        layers=layers,
        layer_pattern=layer_pattern,
        add=add,
        sub=sub,
        rename=rename,
        key=key,
        trust_pickle=trust_pickle,
        alpha=alpha,
        alpha_gradient=alpha_gradient,
        method=method,
        weights=weights,
        density=density,
        gamma=gamma,
        overrides=overrides,
    )
    return describe(base, vectors, opts)


def describe(base: PathLike | Checkpoint, vectors: Any, opts: ApplyOptions) -> dict[str, Any]:
    """:func:`list_tensors` with its options gathered in one :class:`ApplyOptions` (what the CLI calls)."""
    o = opts
    ck_b = open_checkpoint(base, **o.open_opts)
    ck_b, terms, notes, ties = build_terms(ck_b, as_list(vectors), o.add, o.sub, o.weights, rename=o.rename,
                                           opts=o.open_opts)  # fmt: skip
    mask = TensorMask.build(include=o.include, exclude=o.exclude, layers=o.layers, layer_pattern=o.layer_pattern)
    touched = [n for n in ck_b.tensors if any(n in t.a.tensors for t in terms)]
    desc = mask.describe(touched)
    desc["params"], desc["warnings"] = _effective_params(
        ck_b, desc["selected"], [t.weight for t in terms], alpha=o.alpha, alpha_gradient=o.alpha_gradient,
        method=o.method, density=o.density or None, gamma=o.gamma, overrides=o.overrides, layer_pattern=o.layer_pattern,
    )  # fmt: skip
    desc["untouched"] = [n for n in ck_b.tensors if n not in set(touched)]
    desc["counts"]["untouched"] = len(desc["untouched"])
    pairs: dict[str, list[list[str]]] = {}
    for n in touched:
        for t in terms:
            for ck in (t.a, t.b):
                if ck is not None and ck is not ck_b and n in ck.tensors and ck.tensors[n].name != n:
                    pairs.setdefault(n, []).append([ck.ref, ck.tensors[n].name])
    desc["pairs"] = pairs
    desc["notes"] = notes
    desc["tied"] = ties
    return desc


def _effective_params(
    base: Checkpoint,
    selected: list[str],
    weights: list[float],
    *,
    alpha: float | Sequence[float],
    alpha_gradient: Sequence[float] | None,
    method: str | None,
    density: float | Sequence[float] | None,
    gamma: float | None,
    overrides: Any,
    layer_pattern: str | None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each selected tensor's α, weights (``weights``: the global one of each vector), densities and γ after
    ``--alpha-gradient`` and overrides."""
    n_vectors = len(weights)
    alphas = [float(a) for a in as_list(alpha)] or [1.0]
    dens = [float(d) for d in as_list(density)]
    options = resolve(method, density=dens if len(dens) in (1, n_vectors) and dens else None, gamma=gamma)
    ovr = Overrides.build(overrides, n_vectors=n_vectors, alpha_gradient=alpha_gradient)
    n_layers = count_layers(base.tensors, layer_pattern) if ovr.needs_layers else 0
    out: dict[str, dict[str, Any]] = {}
    resolved = []
    for name in selected:
        p = ovr.resolve(name, n_layers=n_layers, layer_pattern=layer_pattern)
        resolved.append(p)
        a = p.alpha if p.alpha is not None else alphas if len(alphas) > 1 else alphas[0]
        d = p.per_vector("density", n_vectors) or tuple(options.density_for(i) for i in range(n_vectors))
        out[name] = {
            "alpha": a,
            "weights": list(p.per_vector("weight", n_vectors) or weights),
            "density": list(d),
            "gamma": p.merge_options(options).gamma,
            "overrides": {k: i + 1 for k, i in p.source.items()},
        }
    return out, ovr.unused(resolved)
