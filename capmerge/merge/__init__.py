"""The plan, the streaming engine, the CPU compute, masks, overrides and the method registry."""
