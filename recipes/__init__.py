"""capmerge.recipes: YAML merge recipes shipped with capmerge (installed from the top-level ``recipes/`` folder)."""
