"""DTensor (FSDP2) support: local shards, sharding τ like a parameter, one all-reduce of partial sums.

Plain tensors (single process, DDP) never touch :mod:`torch.distributed`. For a DTensor parameter every
direction and reference tensor is kept as the local shard of the parameter's placements, the per-tensor dot
products are computed on local shards and summed over the mesh dimensions the parameter is sharded on — all
tensors with the same sharding are packed into one buffer, so one call costs one collective.
"""

from __future__ import annotations

from typing import Any

import torch

from capmerge.errors import UsageError

__all__ = ["ReduceKey", "all_reduce_sum", "is_dtensor", "local", "reduce_key", "row_offset", "shard_like"]

ReduceKey = tuple[Any, ...] | None
"""The process groups (one per sharded mesh dimension) a partial sum is reduced over; ``None``: not sharded."""


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel parameter)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (differentiable: its gradient flows back as a DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _is_shard(placement: Any) -> bool:
    return bool(placement.is_shard()) or type(placement).__name__ == "_StridedShard"


def reduce_key(param: torch.Tensor) -> ReduceKey:
    """The process groups over which local partial sums of ``param`` must be added (``None``: none).

    Raises:
        UsageError: For a parameter with a ``Partial`` placement (its local values are not a shard of it).
    """
    if not is_dtensor(param):
        return None
    groups = []
    for dim, placement in enumerate(param.placements):
        if placement.is_partial():
            raise UsageError("a parameter with a Partial placement cannot be regularised; redistribute it first")
        if _is_shard(placement):
            groups.append(param.device_mesh.get_group(dim))
    return tuple(groups) or None


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The local shard of ``full`` (a tensor of the parameter's global shape) under the parameter's placements.

    Every rank holds ``full`` (each reads the vector), so no data moves: ``src_data_rank=None``.
    """
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def row_offset(param: torch.Tensor) -> int:
    """The global index of the first row (dim 0) of a DTensor's local shard (0 for a plain tensor)."""
    if not is_dtensor(param):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return int(offset[0]) if offset else 0


class _AllReduceSum(torch.autograd.Function):
    """S = Σ_ranks s_r. Backward is the identity: every rank computes the same loss from S, so ∂L/∂s_r = ∂L/∂S."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: tuple[Any, ...]) -> torch.Tensor:
        import torch.distributed as dist

        y = x.clone()
        for group in groups:
            dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def all_reduce_sum(x: torch.Tensor, key: ReduceKey) -> torch.Tensor:
    """Sum ``x`` over the groups of ``key`` (one collective per sharded mesh dimension); identity for ``None``."""
    if key is None:
        return x
    return _AllReduceSum.apply(x, key)
