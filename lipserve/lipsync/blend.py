"""Tensor ops around the Wav2Lip model: face crops in, mouths out, on the model's device.

Colour order: our frames are RGB; the official inference fed the model cv2's BGR crops, and
the model's weights expect that, so crops are flipped to BGR going in and back coming out.

Two implementations of the same arithmetic: torch ops for when the model sits on a GPU (the
crops go up once, only the blended regions come back), and numpy/cv2 for CPU, where dozens of
tiny torch ops per frame cost more in thread hand-offs than they compute (measured: cropping and
blending 16 frames took 1-2 s with 2 torch threads on a busy 2-core machine, ~25 ms on one thread).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MODEL_SIZE = 96


def crops_to_model_input(crops: list[torch.Tensor]) -> torch.Tensor:
    """RGB uint8 crops [h_i, w_i, 3] -> [B, 6, 96, 96] float in [0, 1]: (lower half zeroed | full), BGR.

    Each crop is resized bilinearly (cv2.INTER_LINEAR's sampling) and rounded to whole levels,
    as the official datagen's cv2.resize of uint8 images gives.
    """
    faces = []
    for crop in crops:
        x = crop.permute(2, 0, 1).unsqueeze(0).float()  # 1,3,h,w
        x = F.interpolate(x, size=(MODEL_SIZE, MODEL_SIZE), mode="bilinear", align_corners=False)
        faces.append(x.round_().clamp_(0, 255))
    full = torch.cat(faces).flip(1) / 255.0  # RGB -> BGR
    masked = full.clone()
    masked[:, :, MODEL_SIZE // 2:] = 0  # the model draws the lower half from the audio
    return torch.cat([masked, full], dim=1)


MIN_FEATHER_PX = 4  # a margin narrower than this is no room to feather in; fade inside the crop instead


def paste_mask(height: int, width: int, face: tuple[int, int, int, int] | None, device: torch.device) -> torch.Tensor:
    """[h, w, 1] weights in [0, 1] for pasting the model's output over a crop of h x w pixels.

    `face` is the detected face box inside the crop (x1, y1, x2, y2; the crop is that box grown by
    the pads). Vertically the weight rises from 0 at 40% to 1 at 58% of the crop's height (the model
    redrew the lower half; the upper half is only its reconstruction), stays 1 down to the face
    box's bottom edge (the chin is drawn by the model alone, so a jaw that opens wider leaves no
    faint second chin) and falls to 0 across the pad margin below it. Sideways it is 1 across the
    face and falls off across the side margins. Where a margin is under MIN_FEATHER_PX (pads of 0,
    or a face at the frame's edge) the fall happens inside the crop instead: over its last 8% of
    height, or 10% of width at that side.
    """
    fx1, fy1, fx2, fy2 = face if face is not None else (0, 0, width, height)

    def ramp(n: int, rise: tuple[float, float], fall: tuple[float, float]) -> torch.Tensor:
        t = torch.arange(n, device=device, dtype=torch.float32) + 0.5  # pixel centres
        up = ((t - rise[0]) / max(rise[1] - rise[0], 1e-6)).clamp(0, 1)
        down = ((fall[1] - t) / max(fall[1] - fall[0], 1e-6)).clamp(0, 1)
        return torch.minimum(up, down)

    bottom = (fy2, height) if height - fy2 >= MIN_FEATHER_PX else (0.92 * height, height)
    left = (0, fx1) if fx1 >= MIN_FEATHER_PX else (0, 0.10 * width)
    right = (fx2, width) if width - fx2 >= MIN_FEATHER_PX else (0.90 * width, width)
    vertical = ramp(height, (0.40 * height, 0.58 * height), bottom)
    horizontal = ramp(width, left, right)
    return (vertical[:, None] * horizontal[None, :]).unsqueeze(-1)


def blend_mouths(predictions: torch.Tensor, regions: list[torch.Tensor],
                 faces: list[tuple[int, int, int, int]] | None = None) -> list[torch.Tensor]:
    """Model output [B, 3, 96, 96] (BGR, [0, 1]) + the original crop regions (RGB uint8 [h, w, 3])
    + the face box inside each crop -> blended regions, RGB uint8, each at its crop's size."""
    mouths = predictions.float().flip(1) * 255.0  # BGR -> RGB
    faces = faces if faces is not None else [None] * len(regions)
    blended = []
    for mouth, region, face in zip(mouths, regions, faces):
        height, width = region.shape[:2]
        mouth = F.interpolate(mouth.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False)
        mouth = mouth[0].permute(1, 2, 0)  # h,w,3
        mask = paste_mask(height, width, face, region.device)
        out = region.float() * (1 - mask) + mouth * mask
        blended.append(out.round_().clamp_(0, 255).to(torch.uint8))
    return blended


# ----------------------------------------------------------------------------- CPU (numpy / cv2)

def crops_to_model_input_np(crops: list[np.ndarray]) -> torch.Tensor:
    """crops_to_model_input with cv2.resize, exactly as the official datagen resizes its crops."""
    faces = np.stack([cv2.resize(c, (MODEL_SIZE, MODEL_SIZE)) for c in crops])  # B,96,96,3 uint8 RGB
    full = faces[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) / 255.0      # B,3,96,96 BGR
    masked = full.copy()
    masked[:, :, MODEL_SIZE // 2:] = 0
    return torch.from_numpy(np.concatenate([masked, full], axis=1))


def blend_mouths_np(predictions: torch.Tensor, regions: list[np.ndarray],
                    faces: list[tuple[int, int, int, int]] | None = None) -> list[np.ndarray]:
    """blend_mouths for CPU: same mask and resize, with cv2 and numpy."""
    mouths = predictions.float().numpy()[:, ::-1].transpose(0, 2, 3, 1) * 255.0  # B,96,96,3 RGB
    faces = faces if faces is not None else [None] * len(regions)
    blended = []
    for mouth, region, face in zip(mouths, regions, faces):
        height, width = region.shape[:2]
        mouth = cv2.resize(np.ascontiguousarray(mouth), (width, height), interpolation=cv2.INTER_LINEAR)
        mask = paste_mask(height, width, face, torch.device("cpu")).numpy()
        out = region.astype(np.float32) * (1 - mask) + mouth * mask
        blended.append(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    return blended
