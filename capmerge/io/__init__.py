"""Input formats, tensor-name normalisation and the streaming writer (see docs/architecture.md)."""
