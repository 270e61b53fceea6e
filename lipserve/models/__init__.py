"""The networks, one module each; state_dict keys equal the official checkpoints' (no I/O here)."""
