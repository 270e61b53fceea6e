"""WavLM: our module reproduces the official one (golden_small.npz) and carries its exact keys.

The golden was made by the official WavLM with the scaled-down cfg_small.json and detinit
weights; here those weights reach the module through load_wavlm reading an official-format
file, so the loader is checked too. The Large key set is checked on the meta device.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipserve.errors import WeightsMissing
from lipserve.models.wavlm import WavLM, parse_conv_layers, relative_position_buckets
from lipserve.voice.loaders import load_wavlm, wavlm_large_config
from lipserve.weights.formats import CheckpointFormatError, write_checkpoint
from lipserve.weights.synthetic import synthetic_state_dict
from tests.fixtures.voice_encoders import WAVLM_DIR, read_manifest, voice_settings

ATOL, RTOL = 1e-4, 1e-4  # reference README / index.json for the WavLM outputs


@pytest.fixture(scope="module")
def wavlm_small(wavlm_small_weights_dir) -> WavLM:
    model, synthetic = load_wavlm(voice_settings(wavlm_small_weights_dir))
    assert synthetic is False
    return model


def shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_small_keys_equal_manifest(wavlm_small_cfg):
    assert shapes_of(WavLM(wavlm_small_cfg)) == read_manifest(WAVLM_DIR / "manifest_small.json")


def test_large_keys_and_parameter_count_equal_manifest():
    with torch.device("meta"):
        model = WavLM(wavlm_large_config())
    shapes = shapes_of(model)
    manifest = read_manifest(WAVLM_DIR / "manifest_large.json")
    assert list(shapes) == list(manifest)  # same keys, same (state_dict) order
    assert shapes == manifest
    assert len(shapes) == 488
    assert sum(math.prod(s) for s in shapes.values()) == 315_453_120
    # the structural facts the issue names
    assert shapes["encoder.pos_conv.0.weight_g"] == (1, 1, 128)
    assert shapes["encoder.layers.0.self_attn.relative_attention_bias.weight"] == (320, 16)
    assert not any(k.startswith("encoder.layers.1.self_attn.relative_attention_bias") for k in shapes)


@pytest.mark.parametrize("suffix", ["", "_long"], ids=["1s", "3s_far_buckets"])
def test_golden_small(wavlm_small, wavlm_golden, suffix):
    wav = torch.from_numpy(wavlm_golden["wav" + suffix])[None]  # raw waveform, not normalised
    with torch.inference_mode():
        out, inner = wavlm_small.extract_features(wav, return_layers=True)
    np.testing.assert_allclose(inner["conv_features"].numpy(), wavlm_golden["conv_features" + suffix], rtol=RTOL, atol=ATOL)
    assert len(inner["layer_outputs"]) == 2
    for i, layer_out in enumerate(inner["layer_outputs"]):
        np.testing.assert_allclose(layer_out.numpy(), wavlm_golden[f"layer{i}_out{suffix}"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.numpy(), wavlm_golden["out" + suffix], rtol=RTOL, atol=ATOL)
    # the plain call (as FreeVC's get_content makes it) gives the same features
    with torch.inference_mode():
        np.testing.assert_array_equal(wavlm_small.extract_features(wav).numpy(), out.numpy())


def test_relative_position_buckets_exact_and_log_spaced():
    buckets = relative_position_buckets(1, 2001, num_buckets=320, max_distance=800)[0]  # key offsets 0..2000
    assert buckets[0] == 0 and buckets[1] == 161 and buckets[79] == 239  # exact region, keys after query
    assert buckets[80] == 240  # first log-spaced bucket
    assert buckets[800] == 319 and buckets[2000] == 319  # beyond max_distance: the last bucket
    before = relative_position_buckets(2001, 1, num_buckets=320, max_distance=800)[:, 0]  # keys before query
    assert before[1] == 1 and before[79] == 79 and before[2000] == 159
    assert torch.all(torch.diff(buckets[1:]) >= 0)


def test_cfg_overlays_class_defaults_and_keeps_extra_keys():
    model = WavLM({"encoder_layers": 1, "training_only_key": 3})
    assert model.cfg.encoder_embed_dim == 768 and model.cfg.extractor_mode == "default"
    assert model.cfg.extra["training_only_key"] == 3
    keys = set(model.state_dict())
    # default extractor mode: a GroupNorm in the first conv block only, and no relative bias table
    assert "feature_extractor.conv_layers.0.2.weight" in keys
    assert "feature_extractor.conv_layers.1.2.weight" not in keys
    assert not any("relative_attention_bias" in k or "grep" in k for k in keys)


def test_conv_layer_spec_is_parsed_not_evaluated():
    assert parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2") == (
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2)
    with pytest.raises(ValueError):
        parse_conv_layers("__import__('os').getcwd()")


def test_chunked_features_align_with_a_single_pass(wavlm_small_cfg, wavlm_golden):
    # Without Transformer layers, a frame sees only +-64 frames (the positional conv), so windows
    # with >= 64 frames of context must reproduce the single pass exactly: this checks the window
    # arithmetic (sample offsets, frame alignment, stitching). Too little context must not.
    model = WavLM({**wavlm_small_cfg, "encoder_layers": 0}).eval()
    model.load_state_dict(synthetic_state_dict(shapes_of(model)))
    wav = torch.from_numpy(wavlm_golden["wav_long"])[None]  # 149 frames
    with torch.inference_mode():
        full = model.extract_features(wav)
        chunked = model.extract_features_chunked(wav, chunk_frames=20, context_frames=64)
        short_context = model.extract_features_chunked(wav, chunk_frames=20, context_frames=8)
    assert chunked.shape == full.shape == (1, 149, 256)
    np.testing.assert_allclose(chunked.numpy(), full.numpy(), rtol=1e-5, atol=1e-5)
    assert short_context.shape == full.shape
    assert (short_context - full).abs().max() > 1e-3


def test_too_short_audio_is_rejected(wavlm_small):
    with pytest.raises(ValueError, match="shorter than one WavLM frame"):
        wavlm_small.extract_features(torch.zeros(1, 399))
    assert wavlm_small.extract_features(torch.zeros(1, 400)).shape == (1, 1, 256)


def test_missing_file_names_it_and_the_fetch_command(tmp_path):
    with pytest.raises(WeightsMissing, match=r"WavLM-Large\.pt.*lipserve weights fetch"):
        load_wavlm(voice_settings(tmp_path))


@pytest.mark.slow
def test_large_with_synthetic_weights(tmp_path):
    model, synthetic = load_wavlm(voice_settings(tmp_path, allow_synthetic_weights=True))
    assert synthetic is True
    state = model.state_dict()
    assert sum(v.numel() for v in state.values()) == 315_453_120
    expected = synthetic_state_dict({"encoder.layers.23.fc2.weight": (1024, 4096)})["encoder.layers.23.fc2.weight"]
    assert torch.equal(state["encoder.layers.23.fc2.weight"], expected)
    with torch.inference_mode():
        out = model.extract_features(0.1 * torch.sin(torch.arange(8000.0) * 0.2)[None])
    assert out.shape == (1, 24, 1024)
    assert torch.isfinite(out).all()


def test_cached_positional_weight_follows_new_weights(wavlm_small_cfg):
    # the weight-normed positional conv weight is cached at inference; loading new factors must refresh it
    model = WavLM(wavlm_small_cfg).eval()
    conv = model.encoder.pos_conv[0]
    with torch.no_grad():
        first = conv.weight().clone()
        assert conv.weight() is conv.weight()  # reused between calls
        model.load_state_dict({**model.state_dict(), "encoder.pos_conv.0.weight_g": 2 * conv.weight_g})
        refreshed = conv.weight()
    torch.testing.assert_close(refreshed, 2 * first)
    torch.testing.assert_close(refreshed, torch._weight_norm(conv.weight_v, conv.weight_g, 2))


def test_unusable_cfg_in_the_file_is_named(tmp_path, wavlm_small_cfg):
    cfg = {**wavlm_small_cfg, "conv_feature_layers": "[(512, 10, 5)] + open('x')"}
    write_checkpoint(tmp_path / "WavLM-Large.pt", "wavlm", {}, cfg=cfg)
    with pytest.raises(CheckpointFormatError, match="unusable WavLM cfg"):
        load_wavlm(voice_settings(tmp_path))
