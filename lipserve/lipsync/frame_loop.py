"""The frame loop: every output frame in order, the mouth Wav2Lip draws for it pasted on its face."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..audio.wav2lip_mel import MEL_STEP
from . import blend


def synced_frames(frames: np.ndarray, crop_boxes: np.ndarray, face_boxes: np.ndarray, present: np.ndarray,
                  source_of: np.ndarray, mel: np.ndarray, starts: np.ndarray, steps: dict, *,
                  forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: Callable[[], int],
                  device: torch.device, tensor_ops: bool, first_batch: int | None = None) -> Iterator[np.ndarray]:
    """Yields output frames (RGB uint8) in order: the model runs one batch of face frames at a
    time; frames without a face are yielded exactly as decoded (the same array, not a copy).

    Output frame i shows source frame source_of[i]; `crop_boxes` / `face_boxes` per source frame in
    `frames`' pixels; mel windows start at `starts[i]`. `forward(mel windows, faces) -> mouths`;
    `tensor_ops`: crop and blend with torch on `device`, else with cv2 (blend.py). `first_batch`:
    the first batch holds at most this many face frames (a streamed answer's first fragment
    leaves sooner). Adds seconds to steps['model'] and steps['paste'].
    """
    steps.setdefault("model", 0.0)
    steps.setdefault("paste", 0.0)
    per_batch = batch_size()  # asked when the first frame is pulled
    mel_t = torch.from_numpy(np.ascontiguousarray(mel))
    with_face = [i for i in range(len(source_of)) if present[source_of[i]]]
    next_out = 0
    first = min(first_batch or per_batch, per_batch)
    bounds = [0, *range(first, len(with_face), per_batch), len(with_face)] if with_face else []
    for lo, hi in zip(bounds, bounds[1:]):
        t = time.perf_counter()
        outputs = with_face[lo:hi]
        idx = [int(source_of[i]) for i in outputs]
        regions = [frames[s, y1:y2, x1:x2] for s, (x1, y1, x2, y2) in ((s, crop_boxes[s]) for s in idx)]
        # the detected face inside each crop: the blend feathers in the margin outside it
        inner = [tuple(int(v) for v in face_boxes[s] - np.tile(crop_boxes[s][:2], 2)) for s in idx]
        if tensor_ops:
            regions_t = [torch.from_numpy(np.ascontiguousarray(r)).to(device, non_blocking=True) for r in regions]
            face_input = blend.crops_to_model_input(regions_t)
        else:
            face_input = blend.crops_to_model_input_np(regions)
        windows = torch.stack([mel_t[:, st:st + MEL_STEP] for st in starts[outputs]])
        windows = windows.unsqueeze(1).to(device)  # B,1,80,16
        t_model = time.perf_counter()
        steps["paste"] += t_model - t

        predictions = forward(windows, face_input.to(device))
        t_paste = time.perf_counter()
        steps["model"] += t_paste - t_model

        if tensor_ops:
            with torch.inference_mode():
                mouths = [m.cpu().numpy() for m in blend.blend_mouths(predictions, regions_t, inner)]
        else:
            mouths = blend.blend_mouths_np(predictions, regions, inner)
        out = []
        for i, s, mouth in zip(outputs, idx, mouths):
            while next_out < i:  # frames without a face before this one
                out.append(frames[source_of[next_out]])
                next_out += 1
            x1, y1, x2, y2 = crop_boxes[s]
            frame = frames[s].copy()
            frame[y1:y2, x1:x2] = mouth
            out.append(frame)
            next_out += 1
        steps["paste"] += time.perf_counter() - t_paste
        yield from out
    while next_out < len(source_of):
        yield frames[source_of[next_out]]
        next_out += 1
