"""One options object for a merge: built once by the library call, the CLI or a recipe step, carried to the plan.

:func:`capmerge.apply` keeps its keyword arguments (the public API); it builds an :class:`ApplyOptions` and hands it
to :func:`capmerge.merge.apply.run_apply`, as the CLI and the recipe runner do. Normalisation (scalars to tuples,
paths to strings) happens here, once; validation against the checkpoints happens in the plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any


def as_list(x: Any) -> list[Any]:
    """None → [], a scalar / path / checkpoint → [it], any other iterable → its items."""
    from capmerge.io.checkpoint import Checkpoint

    if x is None:
        return []
    if isinstance(x, str | os.PathLike | Checkpoint | int | float):
        return [x]
    return list(x)


@dataclass(frozen=True)
class ApplyOptions:
    """Everything :func:`capmerge.apply` takes besides BASE, the vectors and OUT (see its docstring for each)."""

    alpha: tuple[float, ...] = (1.0,)
    dtype: str | None = None
    method: str | None = None
    weights: tuple[float, ...] | float | None = None
    density: tuple[float, ...] = ()
    gamma: float | None = None
    sign: str | None = None
    normalize: bool | None = None
    rescale: bool | None = None
    seed: int | None = None
    include: tuple[str, ...] | str | None = None
    exclude: tuple[str, ...] | str | None = None
    layers: str | None = None
    layer_pattern: str | None = None
    alpha_gradient: tuple[float, ...] | None = None
    overrides: Any = None
    add: tuple[Any, ...] = ()
    sub: tuple[Any, ...] = ()
    allow_missing: bool = False
    force: bool = False
    allow_nonfinite: bool = False
    device: str = "auto"
    rename: tuple[str, ...] | str | None = None
    key: str | None = None
    trust_pickle: bool = False
    allow_model_as_vector: bool = False
    open_opts: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        norm = object.__setattr__
        norm(self, "alpha", tuple(float(a) for a in as_list(self.alpha)) or (1.0,))
        norm(self, "density", tuple(float(d) for d in as_list(self.density)))
        norm(self, "add", tuple(as_list(self.add)))
        norm(self, "sub", tuple(as_list(self.sub)))
        if self.weights is not None and not isinstance(self.weights, int | float):
            norm(self, "weights", tuple(float(w) for w in self.weights))
        if self.alpha_gradient is not None:
            norm(self, "alpha_gradient", tuple(float(a) for a in self.alpha_gradient))
        norm(self, "open_opts", {"key": self.key, "trust_pickle": self.trust_pickle})

    @classmethod
    def names(cls) -> list[str]:
        """The option names (what a recipe's apply step and the CLI may set)."""
        return [f.name for f in fields(cls) if f.init]
