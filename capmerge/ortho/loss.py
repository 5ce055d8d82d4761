"""The soft constraint: :class:`OrthogonalityLoss`, an ``nn.Module`` returning λ·penalty, and its report."""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from capmerge.errors import MismatchError, UsageError
from capmerge.io.names import Rename
from capmerge.merge.masks import TensorMask, layer_index
from capmerge.ortho._dist import all_reduce_sum, local, reduce_key, shard_like
from capmerge.ortho._math import Target, check_lora_sharding, group_stats, safe_sqrt
from capmerge.ortho._names import attach
from capmerge.ortho._targets import Match, directions, dot64, load_vectors, match

__all__ = ["MODES", "OrthogonalityLoss"]

MODES = ("cosine2", "projection2", "abs")
REDUCTIONS = ("sum", "mean")
BASES = ("sum", "orthonormal")


def _choice(value: str, allowed: Sequence[str], option: str) -> str:
    if value not in allowed:
        raise UsageError(f"{option} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def reference_map(reference: Any, found: Match, rename: Rename) -> dict[str, Any] | None:
    """A reference checkpoint (path or mapping) by the model's keys, its names paired like the vector's; or ``None``."""
    if reference is None:
        return None
    (ref,) = load_vectors(reference if not isinstance(reference, list | tuple) else list(reference)[:1])
    att = attach(ref, found.keys, prefixes=found.prefixes, rename=rename, what="reference")
    return {key: (ref, n) for key, n in att.names.items()}


def reference_local(refs: dict[str, Any] | None, name: str, param: torch.Tensor) -> torch.Tensor:
    """θ_ref of one parameter, flat, in its dtype, as the local shard under FSDP2 (a view of the parameter itself
    when ``refs`` is ``None``: clone it to keep it)."""
    if refs is None:
        return local(param).detach().reshape(-1)
    if name not in refs:
        raise MismatchError("the reference has no tensor for this parameter", name)
    src_map, src_name = refs[name]
    full = src_map[src_name]
    if tuple(full.shape) != tuple(param.shape):
        raise MismatchError(f"reference shape {list(full.shape)} vs {list(param.shape)}", name)
    return shard_like(full.to(device=local(param).device, dtype=param.dtype), param).reshape(-1)


def stored_rows(dirs: list[torch.Tensor], dtype: torch.dtype) -> tuple[list[torch.Tensor], list[float]]:
    """Directions as stored: scaled to max |u| = 1 (so bf16/fp16 keep their range), and 1/‖u‖ of the stored values."""
    rows, inv = [], []
    for d in dirs:
        row = (d / d.abs().max()).to(dtype)
        rows.append(row)
        inv.append(1.0 / math.sqrt(dot64(row, row)))
    return rows, inv


def _f64(values: list[float], device: torch.device) -> torch.Tensor:
    """A float64 tensor of ``values`` on ``device`` (partial sums for :func:`_sum_over_shards`)."""
    return torch.tensor(values, dtype=torch.float64, device=device)


def _sum_over_shards(parts: list[tuple[Any, torch.Tensor]]) -> list[torch.Tensor]:
    """Each (reduce key, local partial sums) summed over the ranks of its key (one collective per key; parts with
    no key are whole already)."""
    by_key: dict[Any, list[int]] = {}
    for i, (key, _) in enumerate(parts):
        if key is not None:
            by_key.setdefault(key, []).append(i)
    out = [c for _, c in parts]
    for key, idx in by_key.items():
        summed = all_reduce_sum(torch.cat([out[i] for i in idx]), key)
        for i, part in zip(idx, summed.split([out[i].numel() for i in idx]), strict=True):
            out[i] = part
    return out


class OrthogonalityLoss(nn.Module):
    r"""λ·mean_l penalty(Δ_l, τ_l): keeps the update Δ = θ − θ_ref of finetuning orthogonal to capability vectors.

    Per tracked tensor l (a parameter, or the base weight of a PEFT LoRA layer), with τ̂ = τ/‖τ‖:

    * ``"cosine2"``: ⟨Δ_l, τ̂_l⟩² / (‖Δ_l‖² + ε_l²), ε_l = ``eps``·‖θ_ref,l‖ — cos²(Δ_l, τ_l) once the update
      outgrows ε_l (scale-free), ⟨Δ_l, τ̂_l⟩²/ε_l² below it: 0 with a zero gradient at Δ = 0 (step 0), and a
      stiffness along τ̂ bounded by 2/ε_l² (a plain cos² has 2/‖Δ‖², unbounded in the first steps, where its
      gradient overshoots and writes τ's direction into Δ). Keeps a copy of θ_ref (‖Δ‖ needs it).
    * ``"projection2"``: ⟨Δ_l, τ̂_l⟩², evaluated as (⟨θ_l, τ̂_l⟩ − c_l)² with c_l = ⟨θ_ref,l, τ̂_l⟩ precomputed: no
      copy of θ_ref, memory is one copy of τ.
    * ``"abs"``: |⟨Δ_l, τ̂_l⟩| (O-LoRA's L1 form).

    The loss is ``weight`` · R, R the per-tensor terms reduced over the L tracked tensors: ``reduction="mean"``
    (default) R = (1/L)·Σ_l term_l, ``"sum"`` R = Σ_l term_l. With the mean, λ means the same for a model with 100
    tracked tensors and one with 1000: in ``cosine2`` with one vector every term lies in [0, 1], so the loss lies in
    [0, λ] and equals λ·c̄², c̄² the average over tensors of cos²(Δ_l, τ_l). The divisor is the number of tensors,
    never of (tensor, vector) pairs: with several vectors a tensor's term is the sum over its vectors (below), so a
    second vector adds its terms rather than halving the first's. With several
    vectors, ``basis="sum"`` adds the terms of each vector; ``basis="orthonormal"`` uses an orthonormal basis
    q_1..q_K of span(τ_1..τ_K) per tensor (Gram–Schmidt, float64 sums): Σ_k ⟨Δ, q_k⟩² = ‖P_l Δ_l‖² (``"abs"``:
    ‖P_l Δ_l‖, the norm of Δ's component in the span). For a LoRA layer Δ = s·B·A (the whole adapter update, B = 0
    at init) and ⟨Δ, τ⟩ = s·Σ((Bᵀτ) ⊙ A), ‖Δ‖² = s²·Σ((BᵀB) ⊙ (AAᵀ)): B·A is never formed.

    All sums are float32 (float64 for float64 parameters) whatever the parameter dtype, outside autocast. Under FSDP2
    (DTensor parameters) τ is sharded like each parameter and one all-reduce per call adds the partial sums.

    Args:
        model: The model being finetuned (plain, DDP-, FSDP2-, compile- or PEFT-wrapped). Build the loss *after*
            wrapping: it binds to the parameter objects.
        vector: A capability vector — a path (any capmerge checkpoint reference), a mapping name → tensor — or a
            list of them. Names pair with the model's as the checkpoint readers pair names (:mod:`capmerge.io.names`):
            equal names, then names equal up to wrapper prefixes on either side — ``module.`` (DDP), ``_orig_mod.``
            (torch.compile), ``base_model.model.`` (PEFT), ``model.`` and the ``base_model_prefix`` of transformers
            models inside ``model`` (``bert.`` of ``BertForSequenceClassification``, ``transformer.`` of GPT-2) —
            when one to one; a vector tensor that could be two parameters is an error. ``rename=`` does the rest.
        weight: λ, the factor of the reduced penalty (see ``reduction``).
        mode: ``"cosine2"``, ``"projection2"`` or ``"abs"``.
        reduction: ``"mean"`` (default) or ``"sum"`` of the per-tensor terms over the tracked tensors.
        eps: ε_l of ``cosine2`` relative to the reference: ε_l = eps·‖θ_ref,l‖ (for a LoRA layer its base weight's
            norm); 1e-3, about one optimizer step of 1e-5 to 1e-4 on weights of RMS 0.02 to 0.05.
        include, exclude, layers, layer_pattern: The merge masks (:class:`capmerge.merge.masks.TensorMask`), applied to
            the vector's tensor names.
        reference: θ_ref: ``None`` (the parameters now, e.g. θ_meta) or a checkpoint path / mapping. Ignored for LoRA
            layers, whose reference is the base weight.
        dtype: dtype of the stored directions (default: each parameter's; for LoRA the base weight's).
        basis: ``"sum"`` or ``"orthonormal"`` (several vectors).
        ignore_unmatched: Skip vector tensors that match no parameter instead of raising.
        keep_reference: Keep a θ_ref copy in the projection modes too: exact ⟨Δ, τ̂⟩ (no cancellation against c_l)
            and ‖Δ‖, cos in :meth:`report`. Default: only for ``"cosine2"``.
        rename: Renames the vector's (and the reference's) tensor names before pairing: a mapping regex →
            replacement applied in order with ``re.sub`` (as transformers' ``key_mapping``; e.g.
            ``{"^": "backbone."}`` puts ``backbone.`` in front of every name), a callable name → new name, or
            ``'REGEX=REPLACEMENT'`` string(s) as ``capmerge apply --rename``.

    Raises:
        MismatchError: Unmatched names (unless ``ignore_unmatched`` and some names match), a name that could be two
            parameters, shape mismatches, NaN/Inf in a vector.
        UsageError: Bad options, unsupported LoRA variants (DoRA, convolutions).
    """

    def __init__(
        self,
        model: nn.Module,
        vector: Any,
        *,
        weight: float = 1.0,
        mode: str = "cosine2",
        reduction: str = "mean",
        eps: float = 1e-3,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        layers: str | None = None,
        layer_pattern: str | None = None,
        reference: Any = None,
        dtype: torch.dtype | None = None,
        basis: str = "sum",
        ignore_unmatched: bool = False,
        keep_reference: bool | None = None,
        rename: Rename = None,
    ) -> None:
        super().__init__()
        keep = self._options(weight, mode, reduction, basis, eps, keep_reference)
        self._model = weakref.ref(model)
        # τ, θ_ref and constants live here, not in registered buffers: DDP would broadcast buffers every step and
        # FSDP/state_dict would pick them up; _apply below still moves them with .to()/.cuda().
        self._store: dict[str, torch.Tensor] = {}
        self._checked: dict[int, bool] = {}
        vectors = load_vectors(vector)
        self.n_vectors = len(vectors)
        mask = TensorMask.build(include=include, exclude=exclude, layers=layers, layer_pattern=layer_pattern)
        found = match(model, vectors, mask, ignore_unmatched=ignore_unmatched, rename=rename)
        self.frozen, self.unmatched, self.aliases = found.frozen, found.unmatched, found.aliases
        self.zero: list[str] = []
        refs = reference_map(reference, found, rename)
        orthonormal = self.basis == "orthonormal"
        targets: list[Target] = []
        c_parts: list[tuple[Any, torch.Tensor]] = []  # (reduce key, partial c of one target)
        ref_parts: list[tuple[Any, torch.Tensor]] = []  # (reduce key, partial ‖θ_ref‖² of one target)
        self._acc = torch.float32
        for name in found.order:
            taus = [vec[names[name]] for vec, names in zip(vectors, found.vector_names, strict=True) if name in names]
            index = [k for k, names in enumerate(found.vector_names) if name in names]
            lf = found.lora.get(name)
            param = found.dense.get(name)
            anchor = lf.factors[0][1] if lf is not None else param
            if anchor.dtype == torch.float64 or (
                lf is not None and any(a.dtype == torch.float64 for a, _ in lf.factors)
            ):
                self._acc = torch.float64
            work = torch.float64 if anchor.dtype == torch.float64 else torch.float32
            device = local(anchor).device
            if lf is not None:
                taus = [t.t() if lf.transpose else t for t in taus]  # in B·A's layout
            dirs, norms, src = directions([t.to(device) for t in taus], orthonormal=orthonormal, work_dtype=work)
            if not dirs:
                self.zero.append(name)
                continue
            i = len(targets)
            layer = layer_index(name, mask.layer_pattern)
            src = [index[k] if k >= 0 else -1 for k in src]
            if lf is not None:
                key, a_sharded = check_lora_sharding(lf, name)
                base = lf.base.dtype
                store = dtype or (base if base.is_floating_point else lf.factors[0][1].dtype)
                rows, inv = stored_rows(dirs, store)
                u = torch.stack([shard_like(r.view(lf.shape), anchor) for r in rows])
                t = Target(name, layer, f"_u{i}", len(rows), norms, src, key, lora=lf, a_sharded=a_sharded)
                c = torch.zeros(len(rows), dtype=torch.float64, device=device)
                w0 = local(lf.base).reshape(-1)
                ref_parts.append((reduce_key(lf.base), _f64([dot64(w0, w0)], device)))
            else:
                key = reduce_key(param)
                rows, inv = stored_rows(dirs, dtype or param.dtype)
                u = torch.stack([shard_like(r.view(param.shape), param).reshape(-1) for r in rows])
                ref = reference_local(refs, name, param)
                t = Target(name, layer, f"_u{i}", len(rows), norms, src, key, param=param)
                ref_parts.append((key, _f64([dot64(ref.reshape(-1), ref.reshape(-1))], device)))
                if keep:
                    t.ref = f"_r{i}"
                    self._store[t.ref] = ref.clone()
                    c = torch.zeros(len(rows), dtype=torch.float64, device=device)
                else:
                    c = torch.tensor([dot64(ref, u[k]) for k in range(len(rows))], dtype=torch.float64, device=device)
                    c = c * torch.tensor(inv, dtype=torch.float64, device=device)
            self._store[t.u] = u
            t.extra["inv"], t.extra["device"] = inv, device
            c_parts.append((t.key, c))
            targets.append(t)
        self._finish(targets, c_parts, ref_parts)

    def _options(self, weight: float, mode: str, reduction: str, basis: str, eps: float,
                 keep_reference: bool | None) -> bool:  # fmt: skip
        """The scalar options, checked; returns whether a θ_ref copy is kept."""
        self.weight = float(weight)
        self.mode = _choice(mode, MODES, "mode")
        self.reduction = _choice(reduction, REDUCTIONS, "reduction")
        self.basis = _choice(basis, BASES, "basis")
        self.eps = float(eps)
        if not (self.eps >= 0 and math.isfinite(self.eps) and math.isfinite(self.weight)):
            raise UsageError(f"weight and eps must be finite and eps ≥ 0 (got weight={weight}, eps={eps})")
        if keep_reference is False and self.mode == "cosine2":
            raise UsageError(
                "mode='cosine2' needs ‖Δ‖, i.e. a copy of the reference: drop keep_reference=False, or use "
                "mode='projection2'"
            )
        return self.mode == "cosine2" if keep_reference is None else bool(keep_reference)

    def _finish(self, targets: list[Target], c_parts: list[tuple[Any, torch.Tensor]],
                ref_parts: list[tuple[Any, torch.Tensor]]) -> None:  # fmt: skip
        """Order targets by (reduce key, device), dense first (the order :func:`group_stats` returns), sum c and
        ‖θ_ref‖² over ranks (one collective per key), and register the per-pair and per-tensor constants."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, t in enumerate(targets):
            groups.setdefault((t.key, str(t.extra["device"])), []).append(i)
        order: list[int] = []
        self._groups: list[tuple[Any, list[Target]]] = []
        for (key, _), idx in groups.items():
            idx = [i for i in idx if targets[i].lora is None] + [i for i in idx if targets[i].lora is not None]
            order.extend(idx)
            self._groups.append((key, [targets[i] for i in idx]))
        c_list = _sum_over_shards(c_parts)  # c_l = ⟨θ_ref, τ̂⟩
        ref2 = _sum_over_shards(ref_parts)  # ‖θ_ref,l‖²
        self._targets = [targets[i] for i in order]
        self._device = targets[order[0]].extra["device"] if targets else torch.device("cpu")
        acc, dev = self._acc, self._device
        inv = [v for i in order for v in targets[i].extra["inv"]]
        owner = [j for j, i in enumerate(order) for _ in range(targets[i].k)]
        c_all = [c_list[i].to(dev) for i in order]
        self._store["_inv"] = torch.tensor(inv, dtype=acc, device=dev)
        self._store["_c"] = torch.cat(c_all).to(acc) if c_all else torch.zeros(0, dtype=acc, device=dev)
        self._store["_owner"] = torch.tensor(owner, dtype=torch.long, device=dev)
        # ε_l² = (eps·‖θ_ref,l‖)², with 1e-24 (ε = 1e-12) below it: 0/0 never happens, also for a zero θ_ref
        eps2 = [self.eps * self.eps * float(ref2[i].to("cpu")) + 1e-24 for i in order]
        self._store["_eps2"] = torch.tensor(eps2, dtype=acc, device=dev)
        self._has_n = [t.lora is not None or t.ref is not None for t in self._targets]

    def _apply(self, fn: Any, recurse: bool = True) -> OrthogonalityLoss:
        """``.to()``, ``.cuda()``, ``.half()`` ... move the stored tensors but never change their dtype: τ keeps the
        chosen precision, θ_ref stays exact and the constants stay float32 (a parent module cast to bf16, e.g. by
        Lightning's ``bf16-true``, would otherwise round them)."""
        for name, buf in list(self._store.items()):
            moved = fn(buf)
            self._store[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        if "_owner" in self._store:
            self._device = self._store["_owner"].device
        return self

    @property
    def names(self) -> list[str]:
        """The tracked tensors (canonical names), in evaluation order."""
        return [t.name for t in self._targets]

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, weight={self.weight}, reduction={self.reduction!r}, basis={self.basis!r}, "
                f"tensors={len(self._targets)}, vectors={self.n_vectors}")  # fmt: skip

    def _check_model(self, model: nn.Module | None) -> None:
        if model is None or model is self._model():
            return
        ok = self._checked.get(id(model))
        if ok is None:
            ids = {id(p) for p in model.parameters()}
            ok = all(id(t.param) in ids if t.param is not None else id(t.lora.factors[0][0]) in ids
                     for t in self._targets)  # fmt: skip
            self._checked[id(model)] = ok
        if not ok:
            raise MismatchError(
                "this OrthogonalityLoss was built on another model's parameters (build it after wrapping)"
            )

    def _sync_devices(self) -> None:
        """Follow the model if it moved after construction (τ moves once more, then stays)."""
        first = self._targets[0]
        if self._store[first.u].device == _anchor(first).device:
            return
        for t in self._targets:
            device = _anchor(t).device
            for name in (t.u, t.ref):
                if name is not None:
                    self._store[name] = self._store[name].to(device)
            t.extra["device"] = device
        self._device = _anchor(first).device
        for name in ("_inv", "_c", "_owner", "_eps2"):
            self._store[name] = self._store[name].to(self._device)

    def _stats(self, want_n: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """p = ⟨Δ_l, τ̂_lk⟩ for every (tensor, direction) pair and N = ‖Δ_l‖² per tensor (0 where not computed)."""
        self._sync_devices()
        ps, ns = [], []
        for key, group in self._groups:
            p, n = group_stats(group, self._store, key, want_n=want_n, acc=self._acc)
            ps.append(p.to(self._device))
            ns.append(n.to(self._device))
        return torch.cat(ps) * self._store["_inv"] - self._store["_c"], torch.cat(ns)

    def _penalty(self, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        sq = p * p
        if self.mode == "cosine2":
            owner = self._store["_owner"]
            terms = sq / (n[owner] + self._store["_eps2"][owner])
        elif self.mode == "projection2":
            terms = sq
        elif self.basis == "orthonormal":  # abs: ‖P_l Δ_l‖ per tensor
            per = torch.zeros(len(self._targets), dtype=p.dtype, device=p.device).index_add(
                0, self._store["_owner"], sq
            )
            terms = safe_sqrt(per)
        else:
            terms = p.abs()
        total = terms.sum()
        return total / len(self._targets) if self.reduction == "mean" else total

    @torch.compiler.disable
    def forward(self, model: nn.Module | None = None) -> torch.Tensor:
        """λ·penalty as a 0-d float32 tensor (float64 for float64 parameters) with a gradient.

        Args:
            model: Optional, for the ``loss_fn(model)`` calling convention: must hold the tracked parameters.
        """
        self._check_model(model)
        if not self._targets:
            return torch.zeros((), dtype=self._acc, device=self._device)
        with torch.autocast(self._device.type, enabled=False):
            p, n = self._stats(want_n=self.mode == "cosine2")
            return self._penalty(p, n) * self.weight

    @torch.no_grad()
    def report(self, *, per_tensor: bool = True, flat: bool = False, prefix: str = "ortho/") -> dict[str, Any]:
        """Where the update stands relative to τ, from the current parameters (one pass, one collective).

        Returns:
            ``{"loss", "penalty", "cos", "proj", "delta_norm", "layers": {block: {...}}, "tensors": {name: {...}}}``
            where ``cos`` = cos(Δ, τ), ``proj`` = ⟨Δ, τ̂⟩ and ``delta_norm`` = ‖Δ‖ — for the whole tracked model, per
            block (``"other"``: outside any block) and per tensor. With several vectors ``cos``/``proj`` are lists
            (one per vector, ``None`` where a vector lacks the tensor); with ``basis="orthonormal"``, ``proj`` is
            ‖PΔ‖ (the component in the span) and ``cos`` = ‖PΔ‖/‖Δ‖. ``cos`` and ``delta_norm`` are ``None`` when ‖Δ‖
            is unknown (projection modes without ``keep_reference``). With ``flat=True``: one level
            ``{prefix + "cos": ..., prefix + "layer3/cos": ..., prefix + "cos/v1": ...}`` of numbers, for loggers.
        """
        if not self._targets:
            return {"loss": 0.0, "penalty": 0.0}
        with torch.autocast(self._device.type, enabled=False):
            p_t, n_t = self._stats(want_n=True)
            penalty = float(self._penalty(p_t, n_t))
        p, n = p_t.tolist(), n_t.tolist()
        ortho = self.basis == "orthonormal"
        rows: list[tuple[Target, list[float], float | None]] = []
        j = 0
        for t, has_n in zip(self._targets, self._has_n, strict=True):
            rows.append((t, p[j : j + t.k], max(n[len(rows)], 0.0) if has_n else None))
            j += t.k
        out: dict[str, Any] = {"loss": self.weight * penalty, "penalty": penalty}
        out.update(self._aggregate(rows, ortho))
        layers: dict[Any, list[Any]] = {}
        for row in rows:
            layers.setdefault(row[0].layer if row[0].layer is not None else "other", []).append(row)
        keys = sorted(k for k in layers if k != "other") + (["other"] if "other" in layers else [])
        out["layers"] = {k: self._aggregate(layers[k], ortho) for k in keys}
        if per_tensor:
            out["tensors"] = {row[0].name: {**self._aggregate([row], ortho), "layer": row[0].layer} for row in rows}
        return _flatten(out, prefix) if flat else out

    def _aggregate(self, rows: list[tuple[Target, list[float], float | None]], ortho: bool) -> dict[str, Any]:
        """cos, proj and ‖Δ‖ of the concatenation of some tensors: Σ⟨Δ_l, τ_l⟩ / (‖Δ‖·‖τ‖)."""
        norms = [n for _, _, n in rows]
        dnorm = None if any(n is None for n in norms) else math.sqrt(sum(norms))  # type: ignore[arg-type]

        def cos(proj: float | None) -> float | None:
            if proj is None or dnorm is None:
                return None
            return proj / dnorm if dnorm > 0 else 0.0

        if ortho:
            proj = math.sqrt(sum(v * v for _, ps, _ in rows for v in ps))
            return {"cos": cos(proj), "proj": proj, "delta_norm": dnorm}
        dots = [0.0] * self.n_vectors
        tau2 = [0.0] * self.n_vectors
        for t, ps, _ in rows:
            for v, tn, k in zip(ps, t.tau_norm, t.vec_index, strict=True):
                dots[k] += v * tn
                tau2[k] += tn * tn
        projs = [d / math.sqrt(s) if s > 0 else None for d, s in zip(dots, tau2, strict=True)]
        coss = [cos(v) for v in projs]
        if self.n_vectors == 1:
            return {"cos": coss[0], "proj": projs[0], "delta_norm": dnorm}
        return {"cos": coss, "proj": projs, "delta_norm": dnorm}


def _anchor(t: Target) -> torch.Tensor:
    """The local tensor whose device a target's data lives on (the parameter, or LoRA's B)."""
    return local(t.param if t.param is not None else t.lora.factors[0][1])


def _flatten(report: Mapping[str, Any], prefix: str) -> dict[str, float]:
    flat: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, list):
            for k, v in enumerate(value):
                put(f"{key}/v{k}", v)
        elif value is not None:
            flat[key] = float(value)

    for key in ("loss", "penalty", "cos", "proj", "delta_norm"):
        put(prefix + key, report.get(key))
    for layer, vals in report.get("layers", {}).items():
        for key, value in vals.items():
            put(f"{prefix}layer{layer}/{key}" if layer != "other" else f"{prefix}other/{key}", value)
    for name, vals in report.get("tensors", {}).items():
        for key in ("cos", "proj", "delta_norm"):
            put(f"{prefix}{name}/{key}", vals[key])
    return flat
