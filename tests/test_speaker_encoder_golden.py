"""Speaker encoder: the network, its mel front end and the utterance embedding reproduce the official code.

Weights reach the module through load_speaker_encoder reading an official-format file
({'step', 'model_state', 'optimizer_state'}) that also holds the training-only similarity_*
tensors, which must be ignored as the official non-strict load ignores them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lipserve.audio.speaker_mel import partial_slices, wav_to_mel
from lipserve.errors import WeightsMissing
from lipserve.models.speaker_encoder import SpeakerEncoder
from lipserve.voice.loaders import load_speaker_encoder
from lipserve.voice.speaker import embed_utterance
from lipserve.weights.formats import CheckpointFormatError, write_checkpoint
from lipserve.weights.synthetic import synthetic_state_dict
from tests.fixtures.voice_encoders import SPEAKER_DIR, read_manifest, voice_settings

ATOL, RTOL = 1e-5, 1e-4  # reference README: speaker encoder outputs


@pytest.fixture(scope="module")
def encoder(speaker_encoder_weights_dir) -> SpeakerEncoder:
    model, synthetic = load_speaker_encoder(voice_settings(speaker_encoder_weights_dir))
    assert synthetic is False
    return model


@pytest.fixture(scope="module")
def embed_golden() -> dict[str, np.ndarray]:
    with np.load(SPEAKER_DIR / "golden_embed.npz") as data:
        return dict(data)


def test_keys_equal_manifest():
    shapes = {k: tuple(v.shape) for k, v in SpeakerEncoder().state_dict().items()}
    manifest = read_manifest(SPEAKER_DIR / "manifest.json")
    assert list(shapes) == list(manifest) and shapes == manifest
    assert sum(int(np.prod(s)) for s in shapes.values()) == 1_423_616


def test_forward_golden(encoder):
    with np.load(SPEAKER_DIR / "golden_forward.npz") as golden:
        mels, expected = golden["mels"], golden["out"]
    with torch.inference_mode():
        out = encoder(torch.from_numpy(mels)).numpy()
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_embed_utterance_golden(encoder, embed_golden):
    embed, partials, wav_slices, details = embed_utterance(encoder, embed_golden["wav"], return_partials=True)
    np.testing.assert_array_equal(details["wav_padded"], embed_golden["wav_padded"])
    np.testing.assert_allclose(details["mel"], embed_golden["mel"], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.array(details["mel_slices"]), embed_golden["mel_slices"])
    np.testing.assert_array_equal(np.array(wav_slices), embed_golden["wav_slices"])
    np.testing.assert_allclose(partials, embed_golden["partial_embeds"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(embed, embed_golden["embed"], rtol=RTOL, atol=ATOL)
    assert embed.dtype == np.float32 and embed.shape == (256,)
    # without return_partials, just the embedding
    np.testing.assert_array_equal(embed_utterance(encoder, embed_golden["wav"]), embed)


def test_mel_front_end_reflects_at_the_edges(embed_golden):
    # librosa >= 0.10 pads with zeros by default; the official front end reflected (edge frames differ ~35 %)
    mel = wav_to_mel(embed_golden["wav_padded"])
    assert mel.shape == (315, 40) and mel.dtype == np.float32
    np.testing.assert_allclose(mel[:2], embed_golden["mel"][:2], rtol=1e-5, atol=1e-6)


def test_partial_slices_cover_short_and_long_audio():
    wav_slices, mel_slices = partial_slices(48000)
    assert mel_slices == [(0, 160), (77, 237), (154, 314)]
    assert wav_slices == [(0, 25600), (12320, 37920), (24640, 50240)]
    # shorter than one window: a single window, padded
    assert partial_slices(4000) == ([(0, 25600)], [(0, 160)])
    # a last window covering less than min_coverage of real audio is dropped
    wav_slices, _ = partial_slices(16000 * 3 + 4000)
    last_start, last_stop = wav_slices[-1]
    assert (52000 - last_start) / (last_stop - last_start) >= 0.75
    wav_slices_all, _ = partial_slices(52000, min_coverage=0.01)
    assert len(wav_slices_all) == len(wav_slices) + 1


def test_missing_model_keys_are_refused(tmp_path):
    state = synthetic_state_dict(read_manifest(SPEAKER_DIR / "manifest.json"))
    del state["linear.bias"]
    write_checkpoint(tmp_path / "pretrained_bak_5805000.pt", "speaker_encoder", state)
    with pytest.raises(CheckpointFormatError, match="linear.bias"):
        load_speaker_encoder(voice_settings(tmp_path))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(WeightsMissing, match=r"pretrained_bak_5805000\.pt"):
        load_speaker_encoder(voice_settings(tmp_path))
    model, synthetic = load_speaker_encoder(voice_settings(tmp_path, allow_synthetic_weights=True))
    assert synthetic is True
    assert torch.equal(model.linear.bias, synthetic_state_dict({"linear.bias": (256,)})["linear.bias"])
