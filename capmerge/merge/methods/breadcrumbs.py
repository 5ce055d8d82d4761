"""Model breadcrumbs: drop both the largest-magnitude outliers (a fraction γ) and the smallest entries, keeping a
band of the density (Davari & Belilovsky, 2024); ``breadcrumbs_ties`` adds TIES sign election."""

from capmerge.merge.methods.base import Method

METHODS = (
    Method("breadcrumbs", prune="breadcrumbs", parameters=("weight", "density", "gamma"),
           summary="keep a magnitude band: drop the top γ outliers and the small entries"),
    Method("breadcrumbs_ties", prune="breadcrumbs", sign="total", parameters=("weight", "density", "gamma"),
           summary="breadcrumbs band, then TIES sign election"),
)  # fmt: skip
