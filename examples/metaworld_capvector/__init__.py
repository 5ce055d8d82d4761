"""The CapVector experiment on Meta-World, end to end through capmerge (``python -m examples.metaworld_capvector``)."""
