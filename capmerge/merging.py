"""``capmerge.apply``: θ_out = θ + α·δ over one or many vectors, with pruning, sign election, masks and sweeps.

All through the one streaming loop: each input tensor is read once (twice for magnitude thresholds: a histogram pass
and the merge pass), whatever the number of outputs of an α / density sweep.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from capmerge._version import __version__
from capmerge.api import PathLike, Summary, _finish_files, _name_mismatch, _refs, _start_progress, parse_dtype
from capmerge.checkpoint import Checkpoint, open_checkpoint
from capmerge.engine import Job, Sink, run
from capmerge.errors import MismatchError, UsageError
from capmerge.masks import TensorMask, check_template, count_layers, expand_template
from capmerge.methods import MergeOptions, resolve
from capmerge.names import normalise
from capmerge.overrides import Overrides, TensorParams
from capmerge.plan import Term, merge_job
from capmerge.writer import Output


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, str | os.PathLike | Checkpoint | int | float):
        return [x]
    return list(x)


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

    Returns the base and the terms as views whose names pair with the base's (:func:`capmerge.names.normalise`),
    the notes on what was renamed, and the tied weights. LoRA adapters' full weights are bound to the base.
    """
    if sub and len(sub) != len(add):
        raise UsageError(f"--sub given {len(sub)} times but --add {len(add)} times (they pair up in order)")
    opts = opts or {}
    cks = [open_checkpoint(v, **opts) for v in [*vectors, *add, *sub]]
    if not cks:
        raise UsageError("no vectors given (pass VECTOR files or --add/--sub checkpoints)")
    base, cks, notes, ties = normalise(base, cks, rename=rename, labels=["BASE", *(c.ref for c in cks)])
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
                    _name_mismatch(sorted(fa - fb), t.a.ref, sorted(fb - fa), t.b.ref) + "; use --allow-missing",
                    t.label,
                )
        for ck in sides:
            missing = [n for n, i in ck.tensors.items() if n not in base.tensors and i.is_float]
            if missing and not allow_missing:
                raise MismatchError(_name_mismatch(missing, "the vector", [], "") + "; use --allow-missing", ck.ref)
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
        gamma / sign / normalize / rescale / seed: pruning and election options (see :mod:`capmerge.methods`).
        include / exclude / layers / layer_pattern: which tensors are merged; the others are copied bit-exactly.
        alpha_gradient: per-layer α interpolated linearly over the block index (tensors outside blocks use α).
        overrides: per-tensor parameters (:mod:`capmerge.overrides`): a list of ``"REGEX:key=value,..."`` strings,
            ``{"filter": REGEX, "alpha": ..., "weight": ..., "density": ..., "gamma": ...}`` mappings or
            ``(REGEX, {...})`` pairs; for each tensor and parameter the first matching override that sets it wins;
            an overridden α or density is pinned across a sweep. Overrides that change nothing are reported in
            ``Summary.warnings``.
        add / sub: three-checkpoint form, τ_j = add_j − sub_j (add_j − base without ``sub``), computed on the fly.
        allow_missing / force / allow_nonfinite / progress / device / rename / key / trust_pickle: as in
            :func:`capmerge.diff` (vector names are paired with the base's; the output keeps the base's names).
        allow_model_as_vector: add a checkpoint of ``vectors`` that is evidently a whole model as it is, instead
            of refusing it (:mod:`capmerge.vectorcheck`; a model belongs in ``add``, which takes τ = model − base);
            integer buffers of vectors (a model's position ids) are then left out, as for ``add``.

    Raises:
        ModelAsVectorError: a checkpoint of ``vectors`` is evidently a model (before anything is written).

    Returns:
        A :class:`~capmerge.api.Summary`; ``outputs`` lists every output of a sweep.
    """
    from capmerge.kernels.device import resolve_device

    t0 = time.perf_counter()
    if output is None:
        raise UsageError("no output given")
    out_tmpl = os.fspath(output)
    code = parse_dtype(dtype, allow_auto=True)
    dev = resolve_device(device)
    alphas = [float(a) for a in _as_list(alpha)] or [1.0]
    opts = {"key": key, "trust_pickle": trust_pickle}
    ck_b = open_checkpoint(base, **opts)
    ck_b, terms, notes, ties = build_terms(ck_b, _as_list(vectors), _as_list(add), _as_list(sub), weights,
                                           rename=rename, opts=opts)  # fmt: skip
    dens_list = [float(d) for d in _as_list(density)]
    density_sweep = "{density}" in out_tmpl
    check_template(out_tmpl, "alpha", alphas)
    check_template(out_tmpl, "density", dens_list if density_sweep else [0.0])
    options = resolve(
        method, prune=None, density=None if density_sweep or not dens_list else dens_list, gamma=gamma, sign=sign,
        normalize=normalize, rescale=rescale, seed=seed, n_vectors=len(terms),
    )  # fmt: skip
    if density_sweep:
        for d in dens_list:
            resolve(method, density=d)  # validates each swept value
        variants = [tuple(d for _ in terms) for d in dens_list or [1.0]]
    else:
        variants = [tuple(options.density_for(i) for i in range(len(terms)))]
    if alpha_gradient is not None and len(alphas) > 1:
        raise UsageError("--alpha-gradient cannot be combined with an --alpha sweep")
    mask = TensorMask.build(include=include, exclude=exclude, layers=layers, layer_pattern=layer_pattern)
    ovr = Overrides.build(overrides, n_vectors=len(terms), alpha_gradient=alpha_gradient)
    n_layers = count_layers(ck_b.tensors, layer_pattern) if ovr.needs_layers else 0
    summary = Summary("apply", out_tmpl, notes=notes, tied=ties)
    resolved: list[TensorParams] = []
    if not allow_model_as_vector:  # first: a model's other mismatches (names, buffers) would only mislead
        from capmerge.vectorcheck import check_checkpoint

        for t in terms:
            if t.b is None:
                check_checkpoint(t.a, ck_b)
    _check_names(ck_b, terms, allow_missing, summary.skipped)
    single_file = out_tmpl.endswith(".safetensors")
    jobs: list[Job] = []
    shard_names: list[str] = []
    sink_of: dict[str, int] = {}
    selected = 0
    for name, ib in ck_b.tensors.items():
        shard = safetensors_name(os.path.basename(ib.shard)) if ck_b.root is not None else "model.safetensors"
        if shard not in sink_of:
            sink_of[shard] = len(shard_names)
            shard_names.append(shard)
        sink = 0 if single_file else sink_of[shard]
        touching = []
        for ti, t in enumerate(terms):
            ia = t.a.tensors.get(name)
            ibb = t.b.tensors.get(name) if t.b is not None else None
            if ia is None or (t.b is not None and ibb is None):
                continue
            for info in (ia, ibb):
                if info is None:
                    continue
                if info.shape != ib.shape:
                    if not allow_missing:
                        raise MismatchError(f"shape mismatch: {list(ib.shape)} in BASE vs {list(info.shape)} in "
                                            f"{t.label}", name)  # fmt: skip
                    summary.skipped[name] = f"shape {list(info.shape)} in {t.label} vs {list(ib.shape)} in BASE"
                    break
                if not (info.is_float and ib.is_float):
                    if (t.b is not None or allow_model_as_vector) and not info.is_float and not ib.is_float:
                        break  # integer buffers of a checkpoint pair (or of a model added as is) are not part of τ
                    raise MismatchError(f"cannot add a {info.dtype} vector tensor to a {ib.dtype} base tensor", name)
            else:
                touching.append((ti, t, ia, ibb))
        is_selected = mask.selects(name)
        if touching and is_selected:
            selected += 1
        out_dtype = code if (code and ib.is_float) else ib.dtype
        if not touching or not is_selected:
            if out_dtype == ib.dtype:
                jobs.append(Job(name, "copy", ib.dtype, ib.shape, [(ck_b, ib)], sink=sink))
            else:  # a pure cast (no terms)
                jobs.append(merge_job(name, (ck_b, ib), [], out_code=out_dtype, options=options, variants=[()],
                                      alphas=[1.0] * len(alphas) * len(variants), sink=sink, device=dev))  # fmt: skip
            continue
        p = ovr.resolve(name, n_layers=n_layers, layer_pattern=layer_pattern)
        resolved.append(p)
        # an overridden α (or the gradient's) and an overridden density are pinned: the same in every sweep output
        tensor_alphas = alphas if p.alpha is None else [p.alpha] * len(alphas)
        dens = p.per_vector("density", len(terms))
        t_variants = variants if dens is None else [dens] * len(variants)
        jobs.append(merge_job(name, (ck_b, ib), touching, out_code=out_dtype, options=p.merge_options(options),
                              variants=t_variants, alphas=tensor_alphas, sink=sink, device=dev,
                              weights=p.per_vector("weight", len(terms))))  # fmt: skip
    if not mask.is_trivial and selected == 0:
        raise UsageError("mask selects no tensors (check --include/--exclude/--layers)")
    summary.warnings += ovr.unused(resolved)
    outs_paths = [expand_template(out_tmpl, alpha=a, density=v[0] if v else 1.0) for v in variants for a in alphas]
    if len(set(outs_paths)) != len(outs_paths):
        raise UsageError("the output template gives several outputs the same name")
    inputs = [ck_b] + [c for t in terms for c in (t.a, t.b) if c is not None]
    outs: list[Output] = []
    try:
        for p in outs_paths:
            outs.append(Output(p, inputs, force=force))
        sinks = []
        for out in outs:
            if out.single_file:
                files = [out.open_file("", [(j.name, j.out_dtype, j.shape) for j in jobs])]
            else:
                files = [out.open_file(s, [(j.name, j.out_dtype, j.shape) for j in jobs if j.sink == i])
                         for i, s in enumerate(shard_names)]  # fmt: skip
            sinks.append(Sink(files))
        _start_progress(progress, jobs)
        stats = run(jobs, sinks, allow_nonfinite=allow_nonfinite, progress=progress, device=dev)
        for vi, v in enumerate(variants):
            for ai, a in enumerate(alphas):
                out = outs[vi * len(alphas) + ai]
                record = _record(ck_b, terms, options, v, a, alpha_gradient, mask, code, dtype, allow_missing, summary)
                record["overrides"] = ovr.to_list() or None
                metadata = {
                    **ck_b.metadata,
                    "format": "pt",
                    "capmerge.kind": "merged",
                    "capmerge.version": __version__,
                    "capmerge.merge": json.dumps(record, separators=(",", ":")),
                }
                if ties:
                    metadata["capmerge.tied"] = json.dumps(ties)
                names = [os.path.basename(out.out)] if out.single_file else shard_names
                index_name = None
                if not out.single_file and ck_b.sharded:
                    index_name = safetensors_name(os.path.basename(ck_b.index_path or "model.safetensors.index.json"))
                files_written, nbytes = _finish_files(out, list(zip(names, sinks[vi * len(alphas) + ai].files,
                                                                    strict=True)), metadata, index_name)  # fmt: skip
                if not out.single_file:
                    if ck_b.root:
                        copied, not_copied = out.copy_non_weight_files(ck_b.root)
                        files_written += copied
                        summary.files_skipped.update(not_copied)
                    out.write_text("capmerge.json", json.dumps(record, indent=2) + "\n")
                    files_written.append("capmerge.json")
                summary.files += files_written
                summary.bytes_written += nbytes
        for out in outs:
            out.commit()
    except BaseException:
        for out in outs:
            out.abort()
        raise
    finally:
        ck_b.close()
        for t in terms:
            t.a.close()
            if t.b is not None and t.b is not ck_b:
                t.b.close()
    summary.outputs = outs_paths
    summary.tensors_written = stats.tensors_written
    summary.tensors_changed = stats.tensors_computed
    summary.tensors_unchanged = stats.tensors_copied
    summary.tensors_skipped = len(summary.skipped)
    summary.bytes_read, summary.bytes_reread = stats.bytes_read, stats.bytes_reread
    summary.seconds = time.perf_counter() - t0
    return summary


def _record(
    base: Checkpoint,
    terms: list[Term],
    options: MergeOptions,
    densities: tuple[float, ...],
    alpha: float,
    alpha_gradient: Sequence[float] | None,
    mask: TensorMask,
    code: str | None,
    dtype: str | None,
    allow_missing: bool,
    summary: Summary,
) -> dict[str, Any]:
    """What ``capmerge.json`` (and the ``capmerge.merge`` header key) records: enough to reproduce the output."""
    vecs = []
    for i, t in enumerate(terms):
        v: dict[str, Any] = {**_refs(t.a), "weight": t.weight, "density": densities[i] if densities else 1.0}
        if t.b is not None:
            v["minus"] = _refs(t.b)
        vecs.append(v)
    return {
        "capmerge_version": __version__,
        "command": "apply",
        "base": _refs(base),
        "vectors": vecs,
        "alpha": alpha,
        "alpha_gradient": list(alpha_gradient) if alpha_gradient is not None else None,
        "method": options.method,
        "options": {
            "prune": options.prune,
            "gamma": options.gamma,
            "sign": options.sign,
            "normalize": options.normalize,
            "rescale": options.rescale,
            "seed": options.seed,
        },
        "mask": None if mask.is_trivial else repr(mask),
        "dtype": dtype or "base",
        "allow_missing": allow_missing,
        "skipped": summary.skipped,
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
    opts = {"key": key, "trust_pickle": trust_pickle}
    ck_b = open_checkpoint(base, **opts)
    ck_b, terms, notes, ties = build_terms(ck_b, _as_list(vectors), _as_list(add), _as_list(sub), weights,
                                           rename=rename, opts=opts)  # fmt: skip
    mask = TensorMask.build(include=include, exclude=exclude, layers=layers, layer_pattern=layer_pattern)
    touched = [n for n in ck_b.tensors if any(n in t.a.tensors for t in terms)]
    desc = mask.describe(touched)
    desc["params"], desc["warnings"] = _effective_params(
        ck_b, desc["selected"], [t.weight for t in terms], alpha=alpha, alpha_gradient=alpha_gradient,
        method=method, density=density, gamma=gamma, overrides=overrides, layer_pattern=layer_pattern,
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
    alphas = [float(a) for a in _as_list(alpha)] or [1.0]
    dens = [float(d) for d in _as_list(density)]
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
