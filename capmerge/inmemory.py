"""In-memory helpers for trainers that already hold the weights: load a vector, add it in place, merge whole models."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from capmerge.errors import MismatchError
from capmerge.io.checkpoint import Checkpoint
from capmerge.io.open import open_checkpoint


class LazyVector(Mapping[str, Any]):
    """A read-on-access mapping name → tensor over a checkpoint (nothing is read until a key is used)."""

    def __init__(self, ck: Checkpoint, device: Any = "cpu") -> None:
        self.checkpoint = ck
        self.device = device

    def __getitem__(self, name: str) -> Any:
        if name not in self.checkpoint.tensors:
            raise KeyError(name)
        t = self.checkpoint.read_tensor(name)
        return t if str(self.device) == "cpu" else t.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, from the header (no data read)."""
        return self.checkpoint.tensors[name].shape

    def __len__(self) -> int:
        return len(self.checkpoint.tensors)


def load_vector(path: str | os.PathLike[str] | Checkpoint, *, lazy: bool = False, device: Any = "cpu") -> Any:
    """Load a capability vector (any checkpoint reference) as ``dict[str, Tensor]``.

    With ``lazy=True`` returns a :class:`LazyVector` that reads each tensor when it is accessed.
    """
    ck = open_checkpoint(path)
    lv = LazyVector(ck, device)
    return lv if lazy else {n: lv[n] for n in ck.tensors}


def _as_mapping(vector: Any) -> Mapping[str, Any]:
    if isinstance(vector, Mapping):
        return vector
    return load_vector(vector, lazy=True)


def apply_to_state_dict(
    state_dict: Mapping[str, Any],
    vector: Any,
    *,
    alpha: float = 1.0,
    allow_missing: bool = False,
    weights: Sequence[float] | None = None,
    method: str | None = None,
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
    device: str | None = "auto",
    allow_model_as_vector: bool = False,
) -> list[str]:
    """θ ← θ + α·δ in place, δ the merge of one or several vectors (mappings or checkpoint references).

    Takes the options of ``capmerge apply`` (methods, weights, densities, masks, per-layer α) with the same
    semantics (:mod:`capmerge.functional`). The math is float32 on each tensor's own device (float64 for float64
    tensors with plain task arithmetic), rounded once into the tensor's dtype. Names and shapes of every vector are
    checked first, so a mismatch changes nothing. Returns the updated names; tensors sharing storage (tied weights)
    are updated once.

    ``device``: ``auto`` computes on each tensor's own device — with the Triton kernels for CUDA tensors (no host
    copy, no temporaries beyond the vector), torch ops elsewhere; ``cpu`` / ``cuda[:N]`` compute there (copying
    tensors that live elsewhere there and back). Every device gives the same values.

    ``overrides``: per-tensor α, weights, densities, γ (:mod:`capmerge.merge.overrides`, as in :func:`capmerge.apply`);
    an override that changes nothing is reported with :func:`warnings.warn`.

    A vector that is evidently a whole model (the base's own finetune, not θ − θ_base) raises
    :class:`~capmerge.errors.ModelAsVectorError` before anything changes, as in :func:`capmerge.apply`
    (:mod:`capmerge.merge.vectorcheck`); ``allow_model_as_vector=True`` adds it as it is (leaving out its integer
    buffers).
    """
    import torch

    from capmerge.kernels.device import is_available, resolve_device, torch_device
    from capmerge.merge.masks import TensorMask, count_layers
    from capmerge.merge.methods import resolve
    from capmerge.merge.overrides import Overrides

    vecs = [_as_mapping(v) for v in (vector if isinstance(vector, list | tuple) else [vector])]
    opts = resolve(method, density=density, gamma=gamma, sign=sign, normalize=normalize, rescale=rescale, seed=seed,
                   n_vectors=len(vecs))  # fmt: skip
    dev = None if device in (None, "auto") else resolve_device(device)
    w = [1.0] * len(vecs) if weights is None else [float(x) for x in weights]
    if len(w) != len(vecs):
        raise MismatchError(f"{len(w)} weights for {len(vecs)} vectors")
    mask = TensorMask.build(include=include, exclude=exclude, layers=layers, layer_pattern=layer_pattern)
    ovr = Overrides.build(overrides, n_vectors=len(vecs), alpha_gradient=alpha_gradient or None)
    n_layers = count_layers(state_dict, layer_pattern) if ovr.needs_layers else 0
    params: dict[str, Any] = {}
    names: list[str] = []
    if not allow_model_as_vector:  # first: a model's other mismatches (names, buffers) would only mislead
        from capmerge.merge.vectorcheck import check_state_dict

        for i, vec in enumerate(vecs):
            check_state_dict(state_dict, vec, label=f"vector {i + 1} of {len(vecs)}")
    for vec in vecs:
        missing = [n for n in vec if n not in state_dict]
        if missing and not allow_missing:
            shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise MismatchError(f"{len(missing)} vector tensors are not in the state dict ({shown})")
        for n in vec:
            if n not in state_dict:
                continue
            p = state_dict[n]
            shape = vec.shape(n) if isinstance(vec, LazyVector) else tuple(vec[n].shape)
            if tuple(p.shape) != tuple(shape):
                raise MismatchError(
                    f"shape mismatch: {list(p.shape)} in the state dict vs {list(shape)} in the vector", n
                )
            if not p.is_floating_point():
                if allow_model_as_vector and not _is_float(vec, n):
                    continue  # a model's integer buffers (position ids) are not part of the vector
                raise MismatchError(f"cannot add a vector to a {p.dtype} tensor", n)
            if n not in names and mask.selects(n):
                names.append(n)
                params[n] = ovr.resolve(n, n_layers=n_layers, layer_pattern=layer_pattern)
    if ovr:
        import warnings

        for message in ovr.unused(params.values()):
            warnings.warn(message, UserWarning, stacklevel=2)
    done, seen = [], set()
    with torch.no_grad():
        for n in names:
            p = state_dict[n]
            key = (p.device, p.data_ptr())
            if p.numel() and key in seen:
                continue
            seen.add(key)
            where = p.device if dev is None else torch_device(dev)
            kernels = dev not in (None, "cpu") or (dev is None and p.is_cuda and is_available())
            x = p if p.device == where else p.to(where)
            pt = params[n]
            tw = pt.per_vector("weight", len(vecs)) or w
            td = pt.per_vector("density", len(vecs)) or [opts.density_for(i) for i in range(len(vecs))]
            raw = [(vec[n].to(device=where), tw[i], td[i], i) for i, vec in enumerate(vecs) if n in vec]
            a = alpha if pt.alpha is None else pt.alpha
            topts = pt.merge_options(opts)
            if not (kernels and _merge_with_kernels(x, n, raw, a, topts)):
                _merge_with_torch(x, n, raw, a, topts)
            if x is not p:
                p.copy_(x)
            done.append(n)
    return done


def _is_float(vec: Mapping[str, Any], name: str) -> bool:
    if isinstance(vec, LazyVector):
        return vec.checkpoint.tensors[name].is_float
    return bool(vec[name].is_floating_point())


def _merge_with_torch(x: Any, name: str, raw: list[tuple[Any, float, float, int]], alpha: float, opts: Any) -> None:
    """The reference path (:mod:`capmerge.functional`) on ``x``'s device."""
    import torch

    from capmerge import functional as F

    terms, tw = [], []
    for t, wi, d, i in raw:
        if opts.prune == "magnitude" and d < 1.0:
            t = F.magnitude_prune(t, d)
        elif opts.prune == "random" and d < 1.0:
            t = F.random_prune(t, d, key=F.tensor_key(opts.seed, name, i), rescale=opts.rescale)
        elif opts.prune == "breadcrumbs":
            t = F.breadcrumbs_prune(t, d, opts.gamma)
        terms.append(t)
        tw.append(wi)
    if x.dtype == torch.float64 and opts.is_plain:
        acc = torch.zeros_like(x)
        for t, wi in zip(terms, tw, strict=True):
            acc = acc + wi * t.to(torch.float64)
        x.copy_(x + alpha * acc)
    else:
        x.copy_(F.merge(x, terms, tw, alpha=alpha, sign=opts.sign, normalize=opts.normalize))


def _merge_with_kernels(x: Any, name: str, raw: list[tuple[Any, float, float, int]], alpha: float, opts: Any) -> bool:
    """The fused Triton merge, in place on ``x``; thresholds found on the device (exact k-th largest |τ|).
    False when the kernels cannot take these tensors (the caller then uses the torch path)."""
    from capmerge import functional as F
    from capmerge.kernels.dispatch import merge_tensors
    from capmerge.kernels.merge import Term
    from capmerge.merge import compute
    from capmerge.merge.plan import kth_largest_abs_tensor

    terms = []
    for t, wi, d, i in raw:
        t = t.contiguous()
        key = F.tensor_key(opts.seed, name, i)
        if opts.prune == "magnitude" and d < 1.0:
            k = F.keep_count(d, t.numel())
            terms.append(Term(t, None, wi, compute.PRUNE_MAGNITUDE, kth_largest_abs_tensor(t, [k])[k], 0.0, key))
        elif opts.prune == "random" and d < 1.0:
            terms.append(Term(t, None, wi, compute.PRUNE_RANDOM, d, d if opts.rescale else 0.0, key))
        elif opts.prune == "breadcrumbs":
            lo, hi = F.breadcrumbs_thresholds(t, d, opts.gamma)
            terms.append(Term(t, None, wi, compute.PRUNE_BAND, lo, hi, key))
        else:
            terms.append(Term(t, None, wi))
    return merge_tensors(x, x, terms, alpha=alpha, sign=opts.sign, normalize=opts.normalize)


def apply_to_model(
    model: Any, vector: Any, *, alpha: float = 1.0, allow_missing: bool = False, **options: Any
) -> list[str]:
    """θ ← θ + α·δ in place on a ``torch.nn.Module``'s parameters and buffers (any device); options as
    :func:`apply_to_state_dict`."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    vecs = vector if isinstance(vector, list | tuple) else [vector]
    vecs = [v if isinstance(v, Mapping) else LazyVector(open_checkpoint(v)) for v in vecs]
    return apply_to_state_dict(tensors, vecs, alpha=alpha, allow_missing=allow_missing, **options)


def merge_state_dicts(
    models: Sequence[Mapping[str, Any]],
    *,
    base: Mapping[str, Any] | None = None,
    method: str = "linear",
    parameters: Mapping[str, object] | None = None,
    model_parameters: Sequence[Mapping[str, object] | None] | Mapping[str, object] | None = None,
    seed: int = 0,
    dtype: Any = None,
) -> dict[str, Any]:
    """Merge whole models held in memory with a model-centric method (mergekit's methods, by mergekit's names).

    Every tensor goes through the same per-tensor function as ``capmerge merge`` and mergekit configurations
    (:mod:`capmerge.merge.methods.models`): widened to float32, merged, rounded once to ``dtype`` (default: the dtype
    the tensor's inputs promote to, as ``capmerge merge`` and mergekit: their own where they agree).

    Args:
        models: state dicts (name → tensor), the non-base models in order; all must hold the same names and shapes.
        base: the base model's state dict, for the methods that take one (``task_arithmetic``, ``ties``, ``slerp``…).
        method: the method's name (``capmerge.merge.methods.registry.MODEL_METHODS``).
        parameters: the method's global parameters (e.g. ``{"t": 0.3}``, ``{"lambda": 0.7}``); defaults filled in.
        model_parameters: one mapping per model (e.g. ``[{"weight": 0.6, "density": 0.5}, ...]``), or one mapping
            for all of them.
        seed: keys the random methods' masks (with the tensor's name and the model's index).
        dtype: the output dtype.

    Returns:
        name → merged tensor. Tensors that are not floating point (integer buffers) are copied from the base (or the
        first model); the other models need not hold them. Unknown or missing parameters and a wrong number of
        models are a :class:`~capmerge.errors.UsageError`; names of floating tensors or shapes that differ, a
        :class:`~capmerge.errors.MismatchError`.
    """
    import torch

    from capmerge.errors import UsageError
    from capmerge.merge.methods.models import TensorInputs
    from capmerge.merge.methods.registry import get_model_method

    m = get_model_method(method)
    per_model = [model_parameters] * len(models) if isinstance(model_parameters, Mapping) or model_parameters is None \
        else list(model_parameters)  # fmt: skip
    if len(per_model) != len(models):
        raise UsageError(f"{len(per_model)} model parameter mappings for {len(models)} models")
    params, mparams = m.resolve(parameters, per_model)
    if m.base == "required" and base is None:
        raise UsageError(f"merge method {method} needs a base model")
    if m.base == "unused" and base is not None:
        raise UsageError(f"merge method {method} takes no base model")
    reference = base if base is not None else models[0] if models else None
    if reference is None:
        raise UsageError(f"merge method {method}: no models given")
    floats = {n for n, t in reference.items() if t.is_floating_point()}
    for label, sd in [("the base", base), *((f"model {i + 1}", x) for i, x in enumerate(models))]:
        if sd is None:
            continue
        names = {n for n, t in sd.items() if t.is_floating_point()}
        if names != floats:  # integer buffers (position_ids, which newer transformers do not save) may differ
            diff = sorted(names ^ floats)
            raise MismatchError(f"{label} holds other floating tensors than the reference ({', '.join(diff[:5])})")
        for n in floats:
            if tuple(sd[n].shape) != tuple(reference[n].shape):
                raise MismatchError(f"{label}: shape {list(sd[n].shape)} vs {list(reference[n].shape)}", n)
    out: dict[str, Any] = {}
    with torch.no_grad():
        for n, ref in reference.items():
            if not ref.is_floating_point():
                out[n] = ref.clone()
                continue
            x = TensorInputs(n, [sd[n].float() for sd in models], mparams, params,
                             None if base is None else base[n].float(), seed)  # fmt: skip
            ins = ([] if base is None else [base[n]]) + [sd[n] for sd in models]
            out[n] = m.fn(x).to(dtype or functools.reduce(torch.promote_types, (t.dtype for t in ins)))
    return out
