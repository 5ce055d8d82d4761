"""TIES-merging: keep each vector's largest-magnitude entries, elect a sign per entry, average the agreeing ones
(Yadav et al., 2023); ``magnitude`` is the pruning step alone."""

from capmerge.merge.methods.base import Method

METHODS = (
    Method("ties", prune="magnitude", sign="total", normalize=True, parameters=("weight", "density"),
           summary="magnitude pruning to a density, sign election, mean of the agreeing entries"),
    Method("magnitude", prune="magnitude", parameters=("weight", "density"),
           summary="magnitude pruning to a density, then a weighted sum"),
)  # fmt: skip
