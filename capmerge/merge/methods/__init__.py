"""Named merge presets → options, with mergekit's defaults so its users can move over.

| method | prune | sign | normalize | rescale |
|---|---|---|---|---|
| task_arithmetic | none | none | no | – |
| ties | magnitude | total | yes | – |
| dare_linear | random | none | no | yes |
| dare_ties | random | total | no | yes |
| breadcrumbs | breadcrumbs | none | no | – |
| breadcrumbs_ties | breadcrumbs | total | no | – |
| magnitude | magnitude | none | no | – |

Any individual option given explicitly overrides the preset.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

from capmerge.errors import UsageError

PRESETS: dict[str, dict[str, object]] = {
    "task_arithmetic": {"prune": "none", "sign": "none", "normalize": False},
    "ties": {"prune": "magnitude", "sign": "total", "normalize": True},
    "dare_linear": {"prune": "random", "sign": "none", "normalize": False, "rescale": True},
    "dare_ties": {"prune": "random", "sign": "total", "normalize": False, "rescale": True},
    "breadcrumbs": {"prune": "breadcrumbs", "sign": "none", "normalize": False},
    "breadcrumbs_ties": {"prune": "breadcrumbs", "sign": "total", "normalize": False},
    "magnitude": {"prune": "magnitude", "sign": "none", "normalize": False},
}
PRUNES = ("none", "magnitude", "random", "breadcrumbs")
SIGNS = ("none", "total", "frequency")


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


def resolve(
    method: str | None = None,
    *,
    prune: str | None = None,
    density: float | tuple[float, ...] | list[float] | None = None,
    gamma: float | None = None,
    sign: str | None = None,
    normalize: bool | None = None,
    rescale: bool | None = None,
    seed: int | None = None,
    n_vectors: int | None = None,
) -> MergeOptions:
    """A preset (default ``task_arithmetic``) with the explicitly given options on top, validated."""
    name = method or "task_arithmetic"
    if name not in PRESETS:
        raise UsageError(f"unknown method {name!r} (choose from {', '.join(PRESETS)})")
    opts = replace(MergeOptions(method=name), **PRESETS[name])  # type: ignore[arg-type]
    given = {"prune": prune, "gamma": gamma, "sign": sign, "normalize": normalize, "rescale": rescale, "seed": seed}
    opts = replace(opts, **{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]
    if density is not None:
        dens = (float(density),) if isinstance(density, int | float) else tuple(float(d) for d in density)
        opts = replace(opts, density=dens)
    if opts.prune not in PRUNES:
        raise UsageError(f"unknown prune mode {opts.prune!r} (choose from {', '.join(PRUNES)})")
    if opts.sign not in SIGNS:
        raise UsageError(f"unknown --sign {opts.sign!r} (choose from {', '.join(SIGNS)})")
    for d in opts.density:
        if not 0.0 < d <= 1.0:
            raise UsageError(f"--density must be in (0, 1], got {d:g}")
    if not 0.0 <= opts.gamma < 1.0:
        raise UsageError(f"--gamma must be in [0, 1), got {opts.gamma:g}")
    if n_vectors is not None and len(opts.density) not in (1, n_vectors):
        raise UsageError(f"--density has {len(opts.density)} values for {n_vectors} vectors")
    return opts


def keep_count(density: float, n: int) -> int:
    """k = max(1, ⌊d·n + ½⌋) entries kept out of n (0 for an empty tensor); density must be in (0, 1]."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return 0 if n == 0 else min(n, max(1, math.floor(density * n + 0.5)))


def tensor_key(seed: int, name: str, index: int = 0) -> int:
    """The 64-bit Philox key of a (seed, tensor name, vector index): masks depend on nothing else."""
    h = hashlib.blake2b(f"{seed}\0{index}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")
