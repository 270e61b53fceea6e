"""Build the lip-sync networks and give them their weights (official files from settings.runtime.weights_dir).

* Wav2Lip: `<settings.lipsync.wav2lip_checkpoint>.pth` (wav2lip.pth or wav2lip_gan.pth). Missing -> WeightsMissing
  naming the file and the fetch command, unless settings.runtime.allow_synthetic_weights, in which case the real
  architecture runs on the deterministic synthetic rule and the caller must flag `synthetic_weights`.
* S3FD: `s3fd.pth`. Missing -> None: the caller falls back to a packaged face detector. Never synthetic,
  because synthetic S3FD boxes would be meaningless and would be pasted over a real video.
A file that is present but not in the official layout raises CheckpointFormatError naming the difference.
"""
from __future__ import annotations

import torch

from ..device import pick_device
from ..models.s3fd import S3FD
from ..models.wav2lip import Wav2Lip
from ..settings import Settings
from ..weights.resolve import build_uninitialized, checkpoint_path, load_weights

S3FD_FILENAME = "s3fd.pth"


def wav2lip_filename(settings: Settings) -> str:
    return f"{settings.lipsync.wav2lip_checkpoint}.pth"


def _ready(net: torch.nn.Module, device: torch.device | str | None, settings: Settings) -> torch.nn.Module:
    device = pick_device(settings.runtime.device) if device is None else torch.device(device)
    net.eval()  # batch norm uses the stored running statistics
    net.requires_grad_(False)  # inference only: no autograd bookkeeping
    # NHWC conv kernels: 15-25 % less CPU time for both nets here (same keys and values; outputs move
    # by float32 rounding only, <= 5e-6 on the goldens), and the layout tensor cores prefer under fp16
    return net.to(device=device, memory_format=torch.channels_last)


def load_wav2lip(settings: Settings, device: torch.device | str | None = None) -> tuple[Wav2Lip, bool]:
    """(Wav2Lip in eval mode on `device`, synthetic_weights). `device` None -> settings.runtime.device."""
    net = build_uninitialized(Wav2Lip)  # every tensor is loaded next
    synthetic, _ = load_weights(
        net, kind="wav2lip", filename=wav2lip_filename(settings), weights_dir=settings.runtime.weights_dir,
        allow_synthetic=settings.runtime.allow_synthetic_weights, what="Wav2Lip (lip sync)",
    )
    return _ready(net, device, settings), synthetic


def load_s3fd(settings: Settings, device: torch.device | str | None = None) -> S3FD | None:
    """S3FD in eval mode on `device`, or None when s3fd.pth is absent from the weights dir."""
    if not checkpoint_path(settings.runtime.weights_dir, S3FD_FILENAME).is_file():
        return None
    net = build_uninitialized(S3FD)
    load_weights(
        net, kind="s3fd", filename=S3FD_FILENAME, weights_dir=settings.runtime.weights_dir,
        allow_synthetic=False, what="S3FD (face detection)",
    )
    return _ready(net, device, settings)
