"""S3FD face detector (Zhang et al., 2017), as packaged with Wav2Lip (face_alignment's `s3fd`).

A VGG-16 trunk with six detection heads. Parameter names equal the official `s3fd.pth` keys
(a plain state_dict): 65 tensors, 22,459,110 values.

Input: x [B,3,H,W] float32, an RGB frame minus (104, 117, 123) per channel (the classic BGR means,
applied to RGB data, which is what Wav2Lip's detector does), NCHW.

Output: 12 tensors, (cls1, reg1, cls2, reg2, ..., cls6, reg6). Head k (k = 1..6) sees a feature map
with nominal stride 2**(k+1) = 4, 8, 16, 32, 64, 128 px; its anchors are squares of side 4 * stride
= 16, 32, 64, 128, 256, 512 px, one per feature cell, centred at (stride/2 + col*stride,
stride/2 + row*stride).
  cls_k [B,2,h_k,w_k]  logits (background, face); softmax over dim 1, take channel 1 as the score.
                       Head 1 computes 4 logits and keeps max(first three) as background
                       ("max-out" against the many small false positives).
  reg_k [B,4,h_k,w_k]  (dx, dy, dw, dh), decoded SSD-style with variances (0.1, 0.2):
                       centre = anchor_centre + d_xy * 0.1 * anchor_size,
                       size   = anchor_size * exp(d_wh * 0.2), then to corner form (x1, y1, x2, y2).
Map heights for an H-pixel input (widths alike): heads 1-3 are H//4, H//8, H//16 (pools floor);
head 4 (fc7) is H//32 + 4, because fc6 is a 3x3 conv with padding 3 that grows the map by 4 cells;
heads 5 and 6 are ceil(previous / 2) (stride-2 3x3 convs, padding 1). For 128x128: 32, 16, 8, 8, 4, 2;
for 360x640: 90x160, 45x80, 22x40, 15x24, 8x12, 4x6. The official decoding still puts head 4's
anchors on the plain stride-32 grid from the top-left cell (so its extra cells sit past the
right/bottom edge); decoders must do the same to reproduce the official boxes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# per-head nominal stride and anchor side, in input pixels (see the module docstring)
HEAD_STRIDES = (4, 8, 16, 32, 64, 128)
ANCHOR_SIZES = tuple(4 * s for s in HEAD_STRIDES)
# subtract from an RGB frame, channel by channel (x[:,0] = R - 104, ...)
PIXEL_MEANS = (104.0, 117.0, 123.0)
BOX_VARIANCES = (0.1, 0.2)


class L2Norm(nn.Module):
    """Scale each position's channel vector to unit length, then by a learned per-channel weight.

    The trunk's early features are much larger than the later ones; this evens out their scales.
    """

    def __init__(self, channels: int, eps: float = 1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=1, padding=0)


class S3FD(nn.Module):
    def __init__(self):
        super().__init__()
        # VGG-16 trunk
        self.conv1_1, self.conv1_2 = _conv3(3, 64), _conv3(64, 64)
        self.conv2_1, self.conv2_2 = _conv3(64, 128), _conv3(128, 128)
        self.conv3_1, self.conv3_2, self.conv3_3 = _conv3(128, 256), _conv3(256, 256), _conv3(256, 256)
        self.conv4_1, self.conv4_2, self.conv4_3 = _conv3(256, 512), _conv3(512, 512), _conv3(512, 512)
        self.conv5_1, self.conv5_2, self.conv5_3 = _conv3(512, 512), _conv3(512, 512), _conv3(512, 512)

        # VGG's fully connected layers as convs; fc6's padding 3 grows the map by 4 (see docstring)
        self.fc6 = _conv3(512, 1024, padding=3)
        self.fc7 = _conv1(1024, 1024)

        # extra layers for the two coarsest scales
        self.conv6_1, self.conv6_2 = _conv1(1024, 256), _conv3(256, 512, stride=2)
        self.conv7_1, self.conv7_2 = _conv1(512, 128), _conv3(128, 256, stride=2)

        self.conv3_3_norm = L2Norm(256)
        self.conv4_3_norm = L2Norm(512)
        self.conv5_3_norm = L2Norm(512)

        # heads: (background, face) logits and box offsets per anchor; the first has 3 background logits
        self.conv3_3_norm_mbox_conf, self.conv3_3_norm_mbox_loc = _conv3(256, 4), _conv3(256, 4)
        self.conv4_3_norm_mbox_conf, self.conv4_3_norm_mbox_loc = _conv3(512, 2), _conv3(512, 4)
        self.conv5_3_norm_mbox_conf, self.conv5_3_norm_mbox_loc = _conv3(512, 2), _conv3(512, 4)
        self.fc7_mbox_conf, self.fc7_mbox_loc = _conv3(1024, 2), _conv3(1024, 4)
        self.conv6_2_mbox_conf, self.conv6_2_mbox_loc = _conv3(512, 2), _conv3(512, 4)
        self.conv7_2_mbox_conf, self.conv7_2_mbox_loc = _conv3(256, 2), _conv3(256, 4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.relu(self.conv1_1(x))
        h = F.relu(self.conv1_2(h))
        h = F.max_pool2d(h, 2, 2)                       # /2

        h = F.relu(self.conv2_1(h))
        h = F.relu(self.conv2_2(h))
        h = F.max_pool2d(h, 2, 2)                       # /4

        h = F.relu(self.conv3_1(h))
        h = F.relu(self.conv3_2(h))
        f3_3 = h = F.relu(self.conv3_3(h))
        h = F.max_pool2d(h, 2, 2)                       # /8

        h = F.relu(self.conv4_1(h))
        h = F.relu(self.conv4_2(h))
        f4_3 = h = F.relu(self.conv4_3(h))
        h = F.max_pool2d(h, 2, 2)                       # /16

        h = F.relu(self.conv5_1(h))
        h = F.relu(self.conv5_2(h))
        f5_3 = h = F.relu(self.conv5_3(h))
        h = F.max_pool2d(h, 2, 2)                       # /32

        h = F.relu(self.fc6(h))                         # /32 map grown by 4 cells
        ffc7 = h = F.relu(self.fc7(h))
        h = F.relu(self.conv6_1(h))
        f6_2 = h = F.relu(self.conv6_2(h))
        h = F.relu(self.conv7_1(h))
        f7_2 = F.relu(self.conv7_2(h))

        f3_3 = self.conv3_3_norm(f3_3)
        f4_3 = self.conv4_3_norm(f4_3)
        f5_3 = self.conv5_3_norm(f5_3)

        cls1 = self.conv3_3_norm_mbox_conf(f3_3)
        reg1 = self.conv3_3_norm_mbox_loc(f3_3)
        cls2 = self.conv4_3_norm_mbox_conf(f4_3)
        reg2 = self.conv4_3_norm_mbox_loc(f4_3)
        cls3 = self.conv5_3_norm_mbox_conf(f5_3)
        reg3 = self.conv5_3_norm_mbox_loc(f5_3)
        cls4 = self.fc7_mbox_conf(ffc7)
        reg4 = self.fc7_mbox_loc(ffc7)
        cls5 = self.conv6_2_mbox_conf(f6_2)
        reg5 = self.conv6_2_mbox_loc(f6_2)
        cls6 = self.conv7_2_mbox_conf(f7_2)
        reg6 = self.conv7_2_mbox_loc(f7_2)

        # max-out background: the smallest anchors see mostly background, so three background
        # logits compete and the largest one stands for the class
        bg1, bg2, bg3, face = torch.chunk(cls1, 4, dim=1)
        cls1 = torch.cat([torch.maximum(torch.maximum(bg1, bg2), bg3), face], dim=1)

        return [cls1, reg1, cls2, reg2, cls3, reg3, cls4, reg4, cls5, reg5, cls6, reg6]
