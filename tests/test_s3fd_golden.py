"""S3FD reproduces the official detector's twelve raw outputs (tests/reference/wav2lip/s3fd/golden.npz).

Loaded through lipserve's loader from a plain-state_dict `s3fd.pth`, as published.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lipserve.lipsync.networks import load_s3fd
from lipserve.models.s3fd import ANCHOR_SIZES, BOX_VARIANCES, HEAD_STRIDES, PIXEL_MEANS, S3FD
from lipserve.weights.formats import CheckpointFormatError, write_checkpoint
from tests.fixtures.lipsync_networks import golden_tolerance, lipsync_settings

S3FD_VALUES = 22_459_110


@pytest.fixture(scope="module")
def s3fd_outputs(official_lipsync_weights_dir, s3fd_golden):
    net = load_s3fd(lipsync_settings(official_lipsync_weights_dir), "cpu")
    assert isinstance(net, S3FD) and not net.training
    with torch.inference_mode():
        return [o.numpy() for o in net(torch.from_numpy(s3fd_golden["x"]))]


def test_state_dict_keys_and_shapes_equal_the_official_manifest(s3fd_manifest):
    state = S3FD().state_dict()
    assert list(state) == list(s3fd_manifest)
    assert {k: tuple(v.shape) for k, v in state.items()} == s3fd_manifest
    assert sum(v.numel() for v in state.values()) == S3FD_VALUES
    assert round(sum(p.numel() for p in S3FD().parameters()) / 1e6, 1) == 22.5


def test_golden_input_is_rgb_minus_the_means(s3fd_golden):
    # the preprocessing the detection code must do: BGR frame -> RGB -> minus (104, 117, 123) -> NCHW
    rgb = s3fd_golden["image_bgr_uint8"][..., ::-1].astype(np.float32)
    x = (rgb - np.array(PIXEL_MEANS, np.float32)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(x, s3fd_golden["x"])


def test_all_twelve_outputs_equal_the_golden(s3fd_outputs, s3fd_golden):
    tolerance = golden_tolerance("wav2lip/s3fd/golden.npz")
    assert len(s3fd_outputs) == 12
    for i, out in enumerate(s3fd_outputs):
        expected = s3fd_golden[f"out{i}"]
        assert out.shape == expected.shape, f"out{i}"
        np.testing.assert_allclose(out, expected, err_msg=f"out{i}", **tolerance)


def _documented_map_size(n: int) -> list[int]:
    head4 = n // 32 + 4  # fc6: 3x3 conv with padding 3
    head5 = -(-head4 // 2)
    return [n // 4, n // 8, n // 16, head4, head5, -(-head5 // 2)]


def test_output_layout_as_documented(s3fd_outputs):
    # (cls, reg) pairs; the conv3_3 head's 4 logits are maxed out to 2; map sizes for 128x128
    for k, size in enumerate([32, 16, 8, 8, 4, 2]):
        assert s3fd_outputs[2 * k].shape == (1, 2, size, size)
        assert s3fd_outputs[2 * k + 1].shape == (1, 4, size, size)


@pytest.mark.parametrize("height, width", [(100, 164), (360, 640)])
def test_map_sizes_follow_the_documented_rule_for_other_frames(height, width):
    net = S3FD().eval()
    with torch.inference_mode():
        outputs = net(torch.zeros(1, 3, height, width))
    sizes = list(zip(_documented_map_size(height), _documented_map_size(width)))
    assert [tuple(o.shape[2:]) for o in outputs[0::2]] == sizes
    assert [tuple(o.shape[2:]) for o in outputs[1::2]] == sizes
    assert [o.shape[1] for o in outputs] == [2, 4] * 6


def _decode_as_documented(outputs: list[np.ndarray]) -> np.ndarray:
    """The module docstring's decoding, written out: [anchors, 5] (x1, y1, x2, y2, score), row-major per head."""
    rows = []
    for k, (stride, anchor) in enumerate(zip(HEAD_STRIDES, ANCHOR_SIZES)):
        logits, deltas = outputs[2 * k][0].astype(np.float64), outputs[2 * k + 1][0].astype(np.float64)
        score = np.exp(logits[1]) / np.exp(logits).sum(axis=0)
        h, w = score.shape
        cy, cx = np.meshgrid(stride / 2 + stride * np.arange(h), stride / 2 + stride * np.arange(w), indexing="ij")
        centre_x = cx + deltas[0] * BOX_VARIANCES[0] * anchor
        centre_y = cy + deltas[1] * BOX_VARIANCES[0] * anchor
        width = anchor * np.exp(deltas[2] * BOX_VARIANCES[1])
        height = anchor * np.exp(deltas[3] * BOX_VARIANCES[1])
        boxes = np.stack([centre_x - width / 2, centre_y - height / 2,
                          centre_x + width / 2, centre_y + height / 2, score], axis=-1)
        rows.append(boxes.reshape(-1, 5))
    return np.concatenate(rows)


def test_documented_decoding_reproduces_the_official_batch_detect(s3fd_outputs, s3fd_golden):
    # batch_detect keeps every anchor scoring above 0.05; with these weights that is all 1428
    official = s3fd_golden["batch_detect_bboxlist"][:, 0]
    ours = _decode_as_documented(s3fd_outputs)
    assert ours.shape == official.shape == (1428, 5)
    np.testing.assert_allclose(ours, official, rtol=1e-4, atol=2e-3)


def test_missing_file_gives_none_even_when_synthetic_weights_are_allowed(tmp_path):
    assert load_s3fd(lipsync_settings(tmp_path), "cpu") is None
    assert load_s3fd(lipsync_settings(tmp_path, allow_synthetic_weights=True), "cpu") is None


def test_wrong_key_set_names_the_difference(tmp_path, s3fd_synthetic_state):
    state = dict(s3fd_synthetic_state)
    del state["conv3_3_norm.weight"]
    state["module.fc7.bias"] = state.pop("fc7.bias")  # a DataParallel-prefixed key has no place in s3fd.pth
    write_checkpoint(tmp_path / "s3fd.pth", "s3fd", state)
    with pytest.raises(CheckpointFormatError) as err:
        load_s3fd(lipsync_settings(tmp_path), "cpu")
    message = str(err.value)
    assert "conv3_3_norm.weight" in message and "fc7.bias" in message and "module.fc7.bias" in message
    assert "s3fd.pth" in message


def test_wrong_shape_is_named(tmp_path, s3fd_synthetic_state):
    state = dict(s3fd_synthetic_state)
    state["conv3_3_norm_mbox_conf.weight"] = torch.zeros(2, 256, 3, 3)  # a head without the max-out channels
    write_checkpoint(tmp_path / "s3fd.pth", "s3fd", state)
    with pytest.raises(CheckpointFormatError, match="conv3_3_norm_mbox_conf.weight"):
        load_s3fd(lipsync_settings(tmp_path), "cpu")


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "s3fd.pth").write_bytes(b"<html>not found</html>")
    with pytest.raises(CheckpointFormatError, match="s3fd.pth"):
        load_s3fd(lipsync_settings(tmp_path), "cpu")
