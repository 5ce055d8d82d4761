"""Which parameters a vector constrains: name matching across wrappers, PEFT LoRA layers, per-tensor directions.

Pure bookkeeping done once at construction; the per-step math lives in :mod:`capmerge.ortho._math`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from capmerge.errors import MismatchError, UsageError
from capmerge.io.names import Rename, canonical_name
from capmerge.merge.masks import TensorMask
from capmerge.ortho._names import attach, model_prefixes, raise_ambiguous, raise_unmatched

__all__ = [
    "LoraFactors",
    "Match",
    "canonical_name",
    "directions",
    "dot64",
    "load_vectors",
    "match",
]

_SHOWN = 10
# Dot products at construction are accumulated in float64, this many elements at a time (bounded scratch memory).
_CHUNK = 1 << 22
# A direction whose residual after Gram–Schmidt is below this fraction of its norm lies in the span of the others.
_RANK_RTOL = 1e-5


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def load_vectors(vector: Any) -> list[Mapping[str, Any]]:
    """One mapping name → tensor per vector: a path (any capmerge checkpoint reference, read lazily), a mapping, or
    a list/tuple of those."""
    from capmerge.inmemory import load_vector
    from capmerge.io.checkpoint import Checkpoint

    items = list(vector) if isinstance(vector, list | tuple) else [vector]
    if not items:
        raise UsageError("no capability vector given (an empty list)")
    out: list[Mapping[str, Any]] = []
    for item in items:
        if isinstance(item, Mapping):
            out.append(item)
        elif isinstance(item, str | os.PathLike | Checkpoint):
            out.append(load_vector(item, lazy=True))
        else:
            raise UsageError(f"a vector must be a path or a mapping of tensors, not {type(item).__name__}")
    return out


def _shape(vec: Mapping[str, Any], name: str) -> tuple[int, ...]:
    shape = getattr(vec, "shape", None)
    if callable(shape):  # LazyVector: from the header, no data read
        return tuple(shape(name))
    return tuple(vec[name].shape)


@dataclass
class LoraFactors:
    """The trainable LoRA adapters of one PEFT layer: Δ(base weight) = Σ_a s_a·B_a·A_a (transposed if ``transpose``)."""

    module: nn.Module
    base: torch.Tensor
    adapters: list[str]
    factors: list[tuple[torch.Tensor, torch.Tensor]]  # (A, B) parameters per adapter
    transpose: bool  # fan_in_fan_out (GPT-2 Conv1D) and embeddings: Δ = (B·A)ᵀ

    def scalings(self) -> list[float]:
        """s_a = lora_alpha / r (or / √r with rsLoRA), read at each call since PEFT's ``set_scale`` may change it."""
        return [float(self.module.scaling[a]) for a in self.adapters]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of B·A, i.e. of the base weight (transposed if ``transpose``)."""
        a, b = self.factors[0]
        return (b.shape[0], a.shape[1])


def _lora_layers(model: nn.Module) -> dict[str, LoraFactors]:
    """PEFT LoRA layers (duck-typed: ``lora_A``, ``lora_B``, ``scaling``) by the canonical name of their base weight."""
    found: dict[str, LoraFactors] = {}
    for mname, mod in model.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and hasattr(mod, "scaling")):
            continue
        base_layer = mod.get_base_layer() if hasattr(mod, "get_base_layer") else getattr(mod, "base_layer", None)
        base = getattr(base_layer, "weight", None)
        if not isinstance(base, torch.Tensor):
            continue
        active = set(getattr(mod, "active_adapters", None) or list(mod.scaling))
        adapters: list[str] = []
        factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        emb_a = getattr(mod, "lora_embedding_A", {})
        emb_b = getattr(mod, "lora_embedding_B", {})
        name = canonical_name(f"{mname}.weight")
        for adapter in mod.scaling:
            if adapter not in active:
                continue
            if adapter in mod.lora_A:
                a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            elif adapter in emb_a:
                a, b = emb_a[adapter], emb_b[adapter]
            else:
                continue
            if not (a.requires_grad or b.requires_grad):
                continue
            if getattr(mod, "use_dora", {}).get(adapter) or getattr(mod, "lora_variant", {}).get(adapter) is not None:
                raise UsageError("LoRA variants (DoRA ...) are not supported: Δ is not s·B·A", name)
            if a.dim() != 2 or b.dim() != 2:
                raise UsageError("only linear and embedding LoRA layers are supported (not convolutions)", name)
            adapters.append(adapter)
            factors.append((a, b))
        if adapters:
            transpose = bool(getattr(mod, "fan_in_fan_out", False)) or adapters[0] in emb_a
            found[name] = LoraFactors(mod, base, adapters, factors, transpose)
    return found


@dataclass
class Match:
    """The outcome of matching vectors to a model; names are the model's canonical parameter names ("keys").

    ``dense``: key → trainable parameter; ``lora``: key → LoRA factors; ``frozen``: keys whose parameter does not
    require a gradient (their Δ stays 0: skipped); ``unmatched``: the vector's canonical names with no parameter
    (only kept with ``ignore_unmatched``); ``aliases``: keys dropped because another vector name already tracks the
    same (tied) parameter; ``keys`` and ``prefixes``: what the names were paired with (for the reference).
    """

    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, LoraFactors] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # tracked keys (dense and LoRA) in vector order
    vector_names: list[dict[str, str]] = field(default_factory=list)  # per vector: key → original tensor name
    keys: list[str] = field(default_factory=list)
    prefixes: tuple[str, ...] = ()


def match(
    model: nn.Module,
    vectors: Sequence[Mapping[str, Any]],
    mask: TensorMask,
    *,
    ignore_unmatched: bool,
    allow_lora: bool = True,
    rename: Rename = None,
) -> Match:
    """Pair every selected vector tensor with a parameter (or a LoRA layer) of ``model``.

    Names pair as in :mod:`capmerge.ortho._names` (``rename=``, then equal canonical names, then wrapper and
    base-model prefixes); masks select by the vector's canonical names.

    Raises:
        MismatchError: Names that match nothing (unless ``ignore_unmatched`` and some match), a name that could be
            several parameters, shapes that differ, two vector names of one vector with the same canonical name, two
            trainable parameters with one canonical name, or a mask that selects nothing.
        UsageError: LoRA layers where ``allow_lora`` is false (gradient projection cannot constrain B·A), a bad
            ``rename=``.
    """
    result = Match()
    params: dict[str, list[torch.Tensor]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        bucket = params.setdefault(canonical_name(pname), [])
        if not any(q is p for q in bucket):
            bucket.append(p)
    lora = _lora_layers(model)
    keys = result.keys = list(dict.fromkeys([*params, *lora]))
    prefixes = result.prefixes = model_prefixes(model)
    seen: dict[str, None] = {}  # model keys, in vector order
    missing: dict[str, None] = {}
    paired: dict[str, None] = {}
    plain = rename is None
    atts = [attach(vec, keys, prefixes=prefixes, rename=rename, select=mask.selects) for vec in vectors]
    for att in atts:
        selected = list(att.plain)
        raise_ambiguous(att, selected, renamed=rename is not None)
        unmatched = set(att.unmatched)
        missing.update((c, None) for c in selected if c in unmatched)
        plain = plain and all(att.plain[c] == c for c in selected)
        for key, src in att.source.items():
            seen.setdefault(key, None)
            paired.setdefault(src, None)
        result.vector_names.append(att.names)
    if not seen and not missing:
        raise MismatchError("the include/exclude/layers options select no tensor of the vector")
    raise_unmatched(list(missing), list(paired), keys, plain=plain, partial_ok=ignore_unmatched)
    result.unmatched = list(missing)
    bad_shape: list[str] = []
    owner: dict[int, str] = {}
    for key in seen:
        shapes = {_shape(vec, names[key]) for vec, names in zip(vectors, result.vector_names, strict=True)
                  if key in names}  # fmt: skip
        if key in lora:
            lf = lora[key]
            if not allow_lora:
                raise UsageError(
                    "gradient projection cannot keep a LoRA update s·B·A orthogonal; use OrthogonalityLoss", key
                )
            # B·A's shape, not the base weight's: a quantized base (QLoRA) stores packed data
            target_shape = lf.shape[::-1] if lf.transpose else lf.shape
        else:
            trainable = [p for p in params[key] if p.requires_grad]
            if len(trainable) > 1:
                raise MismatchError(f"{len(trainable)} trainable parameters match this vector tensor", key)
            target_shape = tuple(params[key][0].shape)
        if shapes != {target_shape}:
            bad_shape.append(f"{key} {sorted(shapes)[0]} vs {target_shape}")
            continue
        if key in lora:
            result.lora[key] = lora[key]
            result.order.append(key)
        elif not trainable:
            result.frozen.append(key)
        elif id(trainable[0]) in owner:
            result.aliases.append(key)  # tied weights: counted once, under the first name
        else:
            owner[id(trainable[0])] = key
            result.dense[key] = trainable[0]
            result.order.append(key)
    if bad_shape:
        raise MismatchError(f"{len(bad_shape)} vector tensors differ in shape from the model: {_shown(bad_shape)}")
    if not result.dense and not result.lora:
        frozen = f": the {len(result.frozen)} parameters it matches are frozen" if result.frozen else ""
        raise MismatchError(f"no trainable parameter of the model is covered by the vector{frozen}")
    return result


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ of two flat tensors, accumulated in float64 a chunk at a time."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, a.numel(), _CHUNK):
        total += torch.dot(a[i : i + _CHUNK].double(), b[i : i + _CHUNK].double())
    return float(total)


def directions(
    taus: Sequence[torch.Tensor], *, orthonormal: bool, work_dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[float], list[int]]:
    """Unit directions of one tensor's vectors, flat, in ``work_dtype`` (float32 or float64).

    Without ``orthonormal``: τ_k/‖τ_k‖ for each non-zero τ_k. With it: modified Gram–Schmidt, twice (float64
    accumulation), dropping directions in the span of the previous ones.

    Returns:
        The directions, ‖τ_k‖ of the vectors they come from (0.0 for basis directions), and the index of that vector
        (−1 for basis directions).
    """
    dirs: list[torch.Tensor] = []
    norms: list[float] = []
    index: list[int] = []
    for k, tau in enumerate(taus):
        t = tau.detach().reshape(-1).to(work_dtype)
        if not bool(torch.isfinite(t).all()):
            raise MismatchError("the vector holds NaN or Inf")
        norm = dot64(t, t) ** 0.5
        if norm == 0.0:
            continue
        if orthonormal:
            for _ in range(2):  # "twice is enough" (Kahan–Parlett) for orthogonality to working precision
                for q in dirs:
                    t = t - dot64(t, q) * q
            rest = dot64(t, t) ** 0.5
            if rest <= _RANK_RTOL * norm:
                continue
            t, norm_out, k_out = t / rest, 0.0, -1
        else:
            t, norm_out, k_out = t / norm, norm, k
        dirs.append(t)
        norms.append(norm_out)
        index.append(k_out)
    return dirs, norms, index
