"""What every merge method is made of: the :class:`Method` record, :class:`MergeOptions`, and the two
helpers that make pruning reproducible (:func:`keep_count`, :func:`tensor_key`). No imports from the families or
the registry: they import this module.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

PRUNES = ("none", "magnitude", "random", "breadcrumbs")
SIGNS = ("none", "total", "frequency")


@dataclass(frozen=True)
class Method:
    """A named merge method: how its vectors are pruned, sign-elected and combined, and what it accepts.

    A method family's module (``capmerge/merge/methods/<family>.py``) lists its methods in ``METHODS``;
    :mod:`capmerge.merge.methods.registry` collects them. ``parameters`` are the per-merge options the method reads
    (the CLI, recipes and the in-memory API check them against it); ``summary`` is one line for help screens.
    """

    name: str
    prune: str = "none"
    sign: str = "none"
    normalize: bool = False
    rescale: bool | None = None  # None: the method does not rescale (the option has no effect)
    parameters: tuple[str, ...] = ("weight",)
    summary: str = ""

    def preset(self) -> dict[str, object]:
        """The options this method sets (explicit options given by a user override them)."""
        out: dict[str, object] = {"prune": self.prune, "sign": self.sign, "normalize": self.normalize}
        if self.rescale is not None:
            out["rescale"] = self.rescale
        return out


@dataclass(frozen=True)
class MergeOptions:
    """How vectors are pruned, sign-elected and combined (see :mod:`capmerge.functional` for the formulas).

    ``density`` holds one value for all vectors or one per vector.
    """

    method: str = "task_arithmetic"
    prune: str = "none"
    density: tuple[float, ...] = (1.0,)
    gamma: float = 0.01
    sign: str = "none"
    normalize: bool = False
    rescale: bool = True
    seed: int = 0

    def density_for(self, i: int) -> float:
        return self.density[i] if len(self.density) > 1 else self.density[0]

    @property
    def is_plain(self) -> bool:
        """No pruning, no sign election, no normalisation: a plain weighted sum."""
        return self.prune == "none" and self.sign == "none" and not self.normalize


def keep_count(density: float, n: int) -> int:
    """k = max(1, ⌊d·n + ½⌋) entries kept out of n (0 for an empty tensor); density must be in (0, 1]."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return 0 if n == 0 else min(n, max(1, math.floor(density * n + 0.5)))


def tensor_key(seed: int, name: str, index: int = 0) -> int:
    """The 64-bit Philox key of a (seed, tensor name, vector index): masks depend on nothing else."""
    h = hashlib.blake2b(f"{seed}\0{index}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")
