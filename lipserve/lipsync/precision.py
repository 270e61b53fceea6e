"""Wav2Lip's reduced precision: autocast is kept only while its output stays close to strict fp32.

Reduced precision (autocast) is kept only while Wav2Lip's output on real-shaped inputs -- 8 face
crops of the test clip (PRECISION_FACES, 96x96) and mel windows of speech-like audio -- stays within
AUTOCAST_MAX_LEVELS of strict fp32 everywhere, in 8-bit levels of the output picture. Half a level:
rounding to 8 bits then moves a pixel by at most one step, and only a pixel already half-way between
two. Measured with CPU autocast on the synthetic weights: fp16 0.15 level max (0.025 mean), bf16 1.04
max (0.19 mean), so fp16 passes and bf16 does not. Not measured on a GPU or on the real checkpoint:
that is what the check at load is for.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..audio.wav2lip_mel import MEL_STEP, SAMPLE_RATE, melspectrogram
from . import blend

log = logging.getLogger("lipserve.lipsync")

AUTOCAST_MAX_LEVELS = 0.5
PRECISION_FACES = Path(__file__).parent / "assets" / "precision_faces.png"

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (mel windows, faces) -> mouths


def precision_probe(n_faces: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Wav2Lip inputs for the precision check: ([n, 6, 96, 96] faces, [n, 1, 80, 16] mel windows)."""
    import cv2

    from ..warmup import speechlike

    strip = cv2.cvtColor(cv2.imread(str(PRECISION_FACES), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    side = strip.shape[0]
    crops = [strip[:, k * side:(k + 1) * side] for k in range(min(n_faces, strip.shape[1] // side))]
    mel = melspectrogram(speechlike(2.0, SAMPLE_RATE, seed=7))
    starts = np.linspace(0, mel.shape[1] - MEL_STEP, len(crops)).astype(int)
    windows = torch.stack([torch.from_numpy(np.ascontiguousarray(mel[:, s:s + MEL_STEP])) for s in starts])
    return blend.crops_to_model_input_np(crops), windows.unsqueeze(1)


def strict_fp32(device: torch.device):
    """A context where CUDA convolutions run in true fp32 (PyTorch lets cuDNN use TF32 by default)."""
    if device.type != "cuda":
        return nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def output_gap(reduced: Forward, fp32: Forward, device: torch.device, n_faces: int = 8) -> float:
    """Max |reduced - fp32| of Wav2Lip's output (8-bit levels) on face crops of the test clip."""
    faces, windows = precision_probe(n_faces)
    faces, windows = faces.to(device), windows.to(device)
    approximate = reduced(windows, faces)
    with strict_fp32(device):
        exact = fp32(windows, faces)
    return float((approximate.float() - exact.float()).abs().max()) * 255.0


def precision_warning(name: str, gap: float | None) -> str | None:
    """The response's note when autocast runs although it is further than AUTOCAST_MAX_LEVELS from fp32."""
    if gap is None or gap <= AUTOCAST_MAX_LEVELS:
        return None
    return (f"lip sync runs {name} as configured although its output differs from fp32 "
            f"by up to {gap:.2f} 8-bit levels (tolerance {AUTOCAST_MAX_LEVELS})")
