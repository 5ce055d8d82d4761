"""The hard constraints: remove the τ̂ component from gradients, or from the update after each optimizer step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from capmerge.errors import MismatchError, UsageError
from capmerge.io.names import Rename
from capmerge.merge.masks import TensorMask
from capmerge.ortho._dist import all_reduce_sum, is_dtensor, local, reduce_key, shard_like
from capmerge.ortho._math import mv_acc
from capmerge.ortho._targets import directions, load_vectors, match
from capmerge.ortho.loss import reference_local, reference_map, stored_rows

__all__ = ["GradientProjection", "project_gradients", "project_updates"]


class GradientProjection:
    """Handle of :func:`project_gradients` / :func:`project_updates`: ``remove()`` (or leave a ``with`` block) to
    stop projecting. ``names`` lists the tracked tensors, ``project_()`` projects the current gradients by hand.

    Per tensor it holds an orthonormal basis q_1..q_K of span(τ_1..τ_K) (one direction for one vector), stored
    like :class:`~capmerge.ortho.OrthogonalityLoss` stores τ (scaled rows, the parameter's dtype unless ``dtype``),
    sharded like the parameter under FSDP2.
    """

    def __init__(self, model: nn.Module, vector: Any, *, reference: Any, dtype: torch.dtype | None, mask: TensorMask,
                 ignore_unmatched: bool, with_c: bool, rename: Rename = None) -> None:  # fmt: skip
        vectors = load_vectors(vector)
        found = match(model, vectors, mask, ignore_unmatched=ignore_unmatched, allow_lora=False, rename=rename)
        refs = reference_map(reference, found, rename)
        self.names: list[str] = []
        self._items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # param, U, 1/‖u‖, c
        self._handles: list[Any] = []
        c_parts: dict[Any, list[int]] = {}
        for name in found.order:
            param = found.dense[name]
            taus = [vec[names[name]] for vec, names in zip(vectors, found.vector_names, strict=True) if name in names]
            device = local(param).device
            work = torch.float64 if param.dtype == torch.float64 else torch.float32
            dirs, _, _ = directions([t.to(device) for t in taus], orthonormal=True, work_dtype=work)
            if not dirs:
                continue
            rows, inv = stored_rows(dirs, dtype or param.dtype)
            u = torch.stack([shard_like(r.view(param.shape), param).reshape(-1) for r in rows])
            acc = torch.float64 if param.dtype == torch.float64 else torch.float32
            inv_t = torch.tensor(inv, dtype=acc, device=device)
            c = torch.zeros(len(rows), dtype=acc, device=device)
            if with_c:
                ref = reference_local(refs, name, param)
                c = mv_acc(u, ref, acc) * inv_t  # partial under FSDP2, summed below
                c_parts.setdefault(reduce_key(param), []).append(len(self._items))
            self.names.append(name)
            self._items.append((param, u, inv_t, c))
        if not self._items:
            raise MismatchError("every selected vector tensor is zero: nothing to project")
        for key, idx in c_parts.items():
            if key is not None:
                summed = all_reduce_sum(torch.cat([self._items[i][3] for i in idx]), key)
                for i, part in zip(idx, summed.split([self._items[i][3].numel() for i in idx]), strict=True):
                    p, u, inv_t, _ = self._items[i]
                    self._items[i] = (p, u, inv_t, part)

    def remove(self) -> None:
        """Unregister every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GradientProjection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _coefficients(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """⟨x_l, q̂_lk⟩ for each tracked tensor's local values x_l (``None``: skipped), summed over shards once."""
        coefs: list[torch.Tensor | None] = []
        by_key: dict[Any, list[int]] = {}
        for i, ((param, u, inv_t, _), x) in enumerate(zip(self._items, tensors, strict=True)):
            if x is None and reduce_key(param) is None:
                coefs.append(None)
                continue
            acc = inv_t.dtype
            coefs.append(torch.zeros_like(inv_t) if x is None else mv_acc(u, x.reshape(-1), acc) * inv_t)
            if reduce_key(param) is not None:  # every rank joins the collective, even without a gradient
                by_key.setdefault(reduce_key(param), []).append(i)
        for key, idx in by_key.items():
            summed = all_reduce_sum(torch.cat([coefs[i] for i in idx]), key)  # type: ignore[misc]
            for i, part in zip(idx, summed.split([self._items[i][2].numel() for i in idx]), strict=True):
                coefs[i] = part
        return coefs

    @torch.no_grad()
    def project_(self) -> None:
        """g ← g − Σ_k ⟨g, q̂_k⟩·q̂_k in place on every tracked parameter's ``.grad`` (one collective under FSDP2)."""
        grads = [None if p.grad is None else local(p.grad) for p, _, _, _ in self._items]
        for (_, u, inv_t, _), g, a in zip(self._items, grads, self._coefficients(grads), strict=True):
            if g is not None and a is not None:
                _subtract(g, u, a * inv_t)

    @torch.no_grad()
    def _project_update(self) -> None:
        """θ ← θ − Σ_k (⟨θ, q̂_k⟩ − c_k)·q̂_k: the update since the reference has no component along q̂."""
        values = [local(p).detach() for p, _, _, _ in self._items]
        for (_, u, inv_t, c), x, a in zip(self._items, values, self._coefficients(values), strict=True):
            _subtract(x, u, (a - c) * inv_t)  # type: ignore[operator]

    def _hook(self, u: torch.Tensor, inv_t: torch.Tensor) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            a = mv_acc(u, grad.reshape(-1), inv_t.dtype) * inv_t * inv_t
            out = torch.addcmul(grad.reshape(-1), u[0], -a[0])
            for k in range(1, u.shape[0]):
                out.addcmul_(u[k], -a[k])
            return out.to(grad.dtype).view(grad.shape)

        return hook


def _subtract(x: torch.Tensor, u: torch.Tensor, a: torch.Tensor) -> None:
    """x ← x − Σ_k a_k·u_k in place (x any shape, u flat rows)."""
    flat = x.view(-1)
    for k in range(u.shape[0]):
        flat.addcmul_(u[k], -a[k])


def _mask(include: Any, exclude: Any, layers: Any, layer_pattern: Any) -> TensorMask:
    return TensorMask.build(include=include, exclude=exclude, layers=layers, layer_pattern=layer_pattern)


def project_gradients(
    model: nn.Module,
    vector: Any,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    layers: str | None = None,
    layer_pattern: str | None = None,
    dtype: torch.dtype | None = None,
    ignore_unmatched: bool = False,
    rename: Rename = None,
) -> GradientProjection:
    """Hard mode: remove the τ̂ component from every gradient, g ← g − Σ_k ⟨g, q̂_k⟩·q̂_k (q̂ orthonormal per tensor).

    With plain SGD (momentum included, no weight decay) every update is then a combination of projected gradients,
    so Δ stays exactly orthogonal to τ (up to rounding) at no loss-computation cost. Adaptive optimizers (Adam)
    rescale coordinates and weight decay pulls θ towards 0: both leave the subspace — use
    :func:`project_updates` or the loss there.

    Args:
        model: The model (any wrapper). Build after wrapping.
        vector: As for :class:`~capmerge.ortho.OrthogonalityLoss`.
        optimizer: If given, project ``.grad`` in a step pre-hook of this optimizer (after gradient accumulation and
            clipping, once per step); needed under FSDP2, where gradients bypass parameter hooks. Without it, a
            tensor hook on each parameter projects each backward's gradient before it is accumulated (and before
            DDP averages it).
        include, exclude, layers, layer_pattern: Masks, as for the loss.
        dtype: dtype of the stored directions (default: the parameter's).
        ignore_unmatched: Skip vector tensors that match no parameter.
        rename: Renames the vector's tensor names before pairing, as for the loss.

    Returns:
        A :class:`GradientProjection`; ``.remove()`` unregisters the hooks.

    Raises:
        MismatchError: As for the loss. UsageError: LoRA layers (projecting the gradients of A and B cannot keep
            B·A orthogonal: use the loss), DTensor parameters without ``optimizer``.
    """
    proj = GradientProjection(model, vector, reference=None, dtype=dtype, ignore_unmatched=ignore_unmatched,
                              mask=_mask(include, exclude, layers, layer_pattern), with_c=False,
                              rename=rename)  # fmt: skip
    if optimizer is not None:
        proj._handles.append(optimizer.register_step_pre_hook(lambda *_: proj.project_()))
        return proj
    for param, u, inv_t, _ in proj._items:
        if is_dtensor(param):
            raise UsageError("DTensor (FSDP2) parameters: pass optimizer= so that .grad is projected before each step")
        proj._handles.append(param.register_hook(proj._hook(u, inv_t)))
    return proj


def project_updates(
    model: nn.Module,
    vector: Any,
    optimizer: torch.optim.Optimizer,
    *,
    reference: Any = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    layers: str | None = None,
    layer_pattern: str | None = None,
    dtype: torch.dtype | None = None,
    ignore_unmatched: bool = False,
    rename: Rename = None,
) -> GradientProjection:
    """Hard mode for any optimizer: after each ``optimizer.step()``, θ ← θ − Σ_k (⟨θ, q̂_k⟩ − c_k)·q̂_k with
    c_k = ⟨θ_ref, q̂_k⟩, so ⟨Δ, τ⟩ = 0 after every step (AdamW, weight decay included), up to the parameter dtype's
    rounding. No reference copy is kept. Arguments as :func:`project_gradients`; ``reference`` as for the loss.
    """
    if optimizer is None:
        raise UsageError("project_updates needs the optimizer whose steps it corrects: pass it as the third argument")
    proj = GradientProjection(model, vector, reference=reference, dtype=dtype, ignore_unmatched=ignore_unmatched,
                              mask=_mask(include, exclude, layers, layer_pattern), with_c=True,
                              rename=rename)  # fmt: skip
    proj._handles.append(optimizer.register_step_post_hook(lambda *_: proj._project_update()))
    return proj
