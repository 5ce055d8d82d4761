"""DARE: drop each entry with probability 1 − density and rescale the kept ones by 1/density (Yu et al., 2024);
``dare_ties`` adds TIES sign election. Masks come from a counter-based generator keyed by (seed, tensor, vector)."""

from capmerge.merge.methods.base import Method

METHODS = (
    Method("dare_linear", prune="random", rescale=True, parameters=("weight", "density"),
           summary="random drop to a density with 1/density rescale, then a weighted sum"),
    Method("dare_ties", prune="random", sign="total", rescale=True, parameters=("weight", "density"),
           summary="random drop with rescale, then TIES sign election"),
)  # fmt: skip
