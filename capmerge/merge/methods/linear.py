"""Task arithmetic: θ + α·Σ w_i·τ_i, no pruning, no election (Ilharco et al., 2023)."""

from capmerge.merge.methods.base import Method

METHODS = (Method("task_arithmetic", summary="θ + α·Σ w_i·τ_i (no pruning, no sign election)"),)
