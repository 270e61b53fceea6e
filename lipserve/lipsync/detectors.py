"""Face detectors for lip sync: S3FD (the official detector's network and decision rule) and
OpenCV's Haar cascade (the fallback), each finding at most one face per frame.

Boxes are float arrays `(x1, y1, x2, y2)` in pixels of the frame they were found in;
`detect_boxes` maps them back from the downscaled copy the detector saw.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from ..gpu import forward_in_halves

# S3FD post-processing constants (the face-alignment / Wav2Lip detector's values)
S3FD_MEAN_RGB = (104.0, 117.0, 123.0)   # subtracted from the RGB image, as the official batch_detect does
S3FD_STRIDES = (4, 8, 16, 32, 64, 128)  # one per head pair (cls_i, reg_i)
S3FD_VARIANCES = (0.1, 0.2)             # centre / size variances of the box encoding
S3FD_CANDIDATE_THRESHOLD = 0.05         # score a location needs to become a candidate
S3FD_NMS_THRESHOLD = 0.3
S3FD_FACE_THRESHOLD = 0.5               # score a box needs after NMS to count as a face
# Real weights leave tens of candidates; synthetic ones leave every anchor (softmax of ~0
# logits is ~0.5), thousands per frame. NMS only ever needs the best few hundred.
S3FD_TOP_K = 750


# ----------------------------------------------------------------------------- S3FD decoding

def s3fd_candidates(outputs: Sequence[torch.Tensor], threshold: float = S3FD_CANDIDATE_THRESHOLD
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Raw S3FD outputs (cls1, reg1, ..., cls6, reg6) -> per image (boxes [M,4], scores [M]).

    Candidates come in the official order: head by head, then row-major over the feature map.
    Anchor of cell (h, w) at stride s: centre (s/2 + w*s, s/2 + h*s), square of side 4*s.
    """
    batch = outputs[0].shape[0]
    per_head_boxes, per_head_scores = [], []
    for head, stride in enumerate(S3FD_STRIDES):
        cls, reg = outputs[2 * head].float(), outputs[2 * head + 1].float()
        score = torch.softmax(cls, dim=1)[:, 1]                 # B,H,W
        _, height, width = score.shape
        ys = torch.arange(height, device=score.device, dtype=torch.float32) * stride + stride / 2
        xs = torch.arange(width, device=score.device, dtype=torch.float32) * stride + stride / 2
        anchor_cy, anchor_cx = torch.meshgrid(ys, xs, indexing="ij")  # H,W
        anchor_size = 4.0 * stride
        cx = anchor_cx + reg[:, 0] * S3FD_VARIANCES[0] * anchor_size
        cy = anchor_cy + reg[:, 1] * S3FD_VARIANCES[0] * anchor_size
        bw = anchor_size * torch.exp(reg[:, 2] * S3FD_VARIANCES[1])
        bh = anchor_size * torch.exp(reg[:, 3] * S3FD_VARIANCES[1])
        x1, y1 = cx - bw / 2, cy - bh / 2
        boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], dim=-1)  # B,H,W,4
        per_head_boxes.append(boxes.reshape(batch, -1, 4))
        per_head_scores.append(score.reshape(batch, -1))
    all_boxes = torch.cat(per_head_boxes, dim=1)
    all_scores = torch.cat(per_head_scores, dim=1)
    result = []
    for b in range(batch):
        keep = all_scores[b] > threshold
        result.append((all_boxes[b][keep], all_scores[b][keep]))
    return result


def box_iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU with the official detector's inclusive-pixel areas (+1 on each side)."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    ix1 = np.maximum(x1[:, None], x1[None, :])
    iy1 = np.maximum(y1[:, None], y1[None, :])
    ix2 = np.minimum(x2[:, None], x2[None, :])
    iy2 = np.minimum(y2[:, None], y2[None, :])
    inter = np.maximum(0.0, ix2 - ix1 + 1) * np.maximum(0.0, iy2 - iy1 + 1)
    return inter / (areas[:, None] + areas[None, :] - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = S3FD_NMS_THRESHOLD,
        top_k: int | None = S3FD_TOP_K) -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, best score first.

    The IoU matrix is computed once (vectorised); the greedy pass then only visits survivors.
    Only the `top_k` best-scoring boxes take part (see S3FD_TOP_K).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    iou = box_iou_matrix(boxes[order].astype(np.float64))
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > threshold
    return order[np.asarray(keep, dtype=np.int64)]


def best_s3fd_face(boxes: np.ndarray, scores: np.ndarray,
                   face_threshold: float = S3FD_FACE_THRESHOLD) -> np.ndarray | None:
    """The official choice: after NMS and the 0.5 score cut, the first (best-scoring) box."""
    keep = nms(boxes, scores)
    keep = keep[scores[keep] > face_threshold]
    if len(keep) == 0:
        return None
    return np.clip(boxes[keep[0]], 0, None)


# ----------------------------------------------------------------------------- detectors

class FaceDetector:
    """Finds at most one face per frame: `detect(frames [N,H,W,3] RGB uint8) -> [box or None]`.

    `detect_lenient` is the second look a stretch gets before it is declared face-less (see
    faces.second_look): it finds more faces and more false ones, so its hits are only believed
    where they continue a face found next to them or agree over several frames.
    """

    name = "?"

    def detect(self, frames: np.ndarray) -> list[np.ndarray | None]:
        raise NotImplementedError

    def detect_lenient(self, frames: np.ndarray) -> list[np.ndarray | None]:
        return self.detect(frames)


class S3FDDetector(FaceDetector):
    """The official detector's network and decision rule, batched on the model's device."""

    name = "s3fd"
    LENIENT_THRESHOLD = 0.3  # the second look's score cut (the official one is S3FD_FACE_THRESHOLD)

    def __init__(self, net: torch.nn.Module, device: torch.device, batch_size: int | None = None):
        self.net = net.eval()
        self.device = device
        self.batch_size = batch_size or (8 if device.type == "cuda" else 2)
        self.timings = {"network": 0.0, "postprocess": 0.0}  # cumulative, for benchmarks
        self._mean = torch.tensor(S3FD_MEAN_RGB, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def raw_outputs(self, frames: np.ndarray) -> list[torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = x.permute(0, 3, 1, 2).float() - self._mean  # RGB minus the official means
        return list(self.net(x))

    def detect(self, frames: np.ndarray, face_threshold: float = S3FD_FACE_THRESHOLD) -> list[np.ndarray | None]:
        found: list[np.ndarray | None] = []
        for start in range(0, len(frames), self.batch_size):
            t0 = time.perf_counter()
            # out of GPU memory: the batch is halved and retried (lipserve.gpu)
            outputs = forward_in_halves(self.raw_outputs, [frames[start:start + self.batch_size]], self.device,
                                        what="S3FD")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            for boxes, scores in s3fd_candidates(outputs):
                found.append(best_s3fd_face(boxes.cpu().numpy(), scores.cpu().numpy(), face_threshold))
            self.timings["network"] += t1 - t0
            self.timings["postprocess"] += time.perf_counter() - t1
        return found

    def detect_lenient(self, frames: np.ndarray) -> list[np.ndarray | None]:
        return self.detect(frames, self.LENIENT_THRESHOLD)


class HaarDetector(FaceDetector):
    """OpenCV's frontal-face Haar cascade: the fallback when `s3fd.pth` is absent.

    Why this one: it is a real, trained face detector whose model file ships inside the
    opencv-python-headless 4.x wheel (`cv2.data.haarcascades`), so it works offline with no new
    dependency. MediaPipe 0.10.14's BlazeFace (weights in its wheel) finds more tilted faces and
    is faster, but it needs protobuf < 5 where Ray's stack has 7, and pulls jax and a second
    OpenCV (docs/PARITY.md). benchmarks/bench_face_recall.py measures recall. Synthetic S3FD
    weights are never used to serve: they find no faces, only noise.

    The cascade runs on the plain grey picture as OpenCV's own samples do: histogram equalisation
    and a fixed cut on the cascade's confidence each lost real faces on the recall benchmark (the
    equalised picture also invents faces in crowds). Its confidence only ranks the hits of one
    frame: the largest of those near the best is taken. The cascade's box ends near the
    chin line, a little higher than S3FD's (which the Wav2Lip crops were trained with), so the
    bottom edge is lowered by CHIN_EXTENSION of the height.
    """

    name = "haar"
    CASCADE = "haarcascade_frontalface_default.xml"
    CHIN_EXTENSION = 0.1
    NEIGHBOURS = 5          # OpenCV's usual setting
    LENIENT_NEIGHBOURS = 2  # the second look: a face that only a couple of windows agree on
    MIN_SIDE = 24           # the cascade's own window
    CONFIDENT_SHARE = 0.5   # hits under this share of the frame's best confidence are not the subject

    def __init__(self):
        path = cv2.data.haarcascades + self.CASCADE
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"cannot load the Haar cascade {path}; is opencv-python-headless 4.x installed?")
        self._lock = threading.Lock()  # a CascadeClassifier must not run in two threads at once

    def detect(self, frames: np.ndarray, neighbours: int | None = None) -> list[np.ndarray | None]:
        found: list[np.ndarray | None] = []
        for frame in frames:
            gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
            with self._lock:
                faces, _, confidence = self.cascade.detectMultiScale3(
                    gray, scaleFactor=1.1, minNeighbors=neighbours or self.NEIGHBOURS,
                    minSize=(self.MIN_SIDE, self.MIN_SIDE), outputRejectLevels=True)
            if len(faces) == 0:
                found.append(None)
                continue
            # the largest of the confident hits is the selfie's subject; a weak hit beside the face
            # (clutter, a cup's edge) can be larger than it
            confidence = np.ravel(confidence)
            best = float(confidence.max())
            floor = self.CONFIDENT_SHARE * best if best > 0 else best  # level weights can be negative
            confident = [f for f, c in zip(faces, confidence) if c >= floor]
            x, y, w, h = max(confident, key=lambda f: f[2] * f[3])
            bottom = min(frame.shape[0], y + h * (1 + self.CHIN_EXTENSION))
            found.append(np.array([x, y, x + w, bottom], dtype=np.float64))
        return found

    def detect_lenient(self, frames: np.ndarray) -> list[np.ndarray | None]:
        return self.detect(frames, self.LENIENT_NEIGHBOURS)


def detect_boxes(detector: FaceDetector, frames: np.ndarray, max_side: int) -> list[np.ndarray | None]:
    """Run `detector` on copies of `frames` whose longer side is at most `max_side`; boxes in frame pixels."""
    height, width = frames.shape[1:3]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
        sx, sy = width / size[0], height / size[1]
    else:
        small, sx, sy = frames, 1.0, 1.0
    boxes = detector.detect(small)
    scale_back = np.array([sx, sy, sx, sy])
    return [None if b is None else np.asarray(b, dtype=np.float64) * scale_back for b in boxes]
