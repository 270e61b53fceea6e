"""Checkpoint formats, the synthetic-weight rule, the manifest and fetch/verify."""
