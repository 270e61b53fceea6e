"""Device and precision choice: CUDA when present (and asked for), CPU otherwise."""
from __future__ import annotations

import torch

from .errors import ModelNotLoaded


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise ModelNotLoaded("device=cuda was configured but no CUDA device is visible; set LIPSERVE_DEVICE=auto or cpu")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """dtype for torch.autocast, or None for plain fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16
