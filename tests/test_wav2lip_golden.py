"""Wav2Lip and its audio front end reproduce the official code's goldens (tests/reference/wav2lip/).

The network is loaded through lipserve's own loader from a checkpoint file written in the official
layout, so these tests cover the file format, the key names and the arithmetic together.
"""
from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from lipserve.audio import mel_basis, mel_chunk_starts, mel_chunks, melspectrogram
from lipserve.audio.wav2lip_mel import preemphasize, stft_magnitude
from lipserve.errors import InvalidAudio, InvalidMedia, WeightsMissing
from lipserve.lipsync.networks import load_wav2lip
from lipserve.models.wav2lip import Wav2Lip
from lipserve.weights.formats import CheckpointFormatError, write_checkpoint
from tests.fixtures.lipsync_networks import golden_tolerance, lipsync_settings

WAV2LIP_VALUES = 36_320_787  # manifest: every tensor except the 50 BatchNorm step counters


@pytest.fixture(scope="module")
def wav2lip_from_file(official_lipsync_weights_dir):
    net, synthetic = load_wav2lip(lipsync_settings(official_lipsync_weights_dir), "cpu")
    return net, synthetic


def _run(net: Wav2Lip, mel: np.ndarray, face: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(mel), torch.from_numpy(face)).numpy()


# --- the network -------------------------------------------------------------------------------

def test_state_dict_keys_and_shapes_equal_the_official_manifest(wav2lip_manifest):
    state = Wav2Lip().state_dict()
    assert list(state) == list(wav2lip_manifest)  # same names, same order
    assert {k: tuple(v.shape) for k, v in state.items()} == wav2lip_manifest
    values = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert values == WAV2LIP_VALUES
    parameters = sum(p.numel() for p in Wav2Lip().parameters())
    assert round(parameters / 1e6, 1) == 36.3


def test_golden_output_through_an_official_format_checkpoint(wav2lip_from_file, wav2lip_golden):
    net, synthetic = wav2lip_from_file
    assert synthetic is False
    assert not net.training
    out = _run(net, wav2lip_golden["mel"], wav2lip_golden["face"])
    assert out.shape == (2, 3, 96, 96) and out.dtype == np.float32
    np.testing.assert_allclose(out, wav2lip_golden["out"], **golden_tolerance("wav2lip/golden.npz"))


def test_golden_face_input_is_the_documented_crop_layout(wav2lip_golden):
    # the stored face tensor is [masked crop, full crop] / 255 in BGR, NCHW: the layout the sync loop must build
    crops = wav2lip_golden["face_crops_bgr_uint8"]
    masked = crops.copy()
    masked[:, 48:] = 0
    face = (np.concatenate([masked, crops], axis=3) / 255.0).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(face, wav2lip_golden["face"], atol=1e-7)


def test_sequence_input_matches_per_frame_input(wav2lip_from_file, wav2lip_golden):
    # training-style [B,T,...] input folds time into the batch and gives [B,3,T,96,96]
    net, _ = wav2lip_from_file
    mel = wav2lip_golden["mel"][None]                           # [1,2,1,80,16]
    face = wav2lip_golden["face"].transpose(1, 0, 2, 3)[None]   # [1,6,2,96,96]
    out = _run(net, mel, face)
    assert out.shape == (1, 3, 2, 96, 96)
    np.testing.assert_allclose(out[0].transpose(1, 0, 2, 3), wav2lip_golden["out"], atol=1e-5, rtol=1e-4)


def test_wrong_key_set_names_the_difference(tmp_path, wav2lip_synthetic_state):
    state = dict(wav2lip_synthetic_state)
    state["output_block.2.weight"] = state.pop("output_block.1.weight")
    write_checkpoint(tmp_path / "wav2lip_gan.pth", "wav2lip", state)
    with pytest.raises(CheckpointFormatError) as err:
        load_wav2lip(lipsync_settings(tmp_path), "cpu")
    message = str(err.value)
    assert "output_block.1.weight" in message and "output_block.2.weight" in message
    assert "wav2lip_gan.pth" in message


def test_a_plain_state_dict_is_not_taken_for_a_wav2lip_checkpoint(tmp_path, wav2lip_synthetic_state):
    # the official Wav2Lip files wrap the weights in {'state_dict': ...}; a bare dict is a different file
    write_checkpoint(tmp_path / "wav2lip.pth", "s3fd", wav2lip_synthetic_state)
    with pytest.raises(CheckpointFormatError, match="state_dict"):
        load_wav2lip(lipsync_settings(tmp_path, wav2lip_checkpoint="wav2lip"), "cpu")


def test_missing_file_names_the_file_and_the_fetch_command(tmp_path):
    with pytest.raises(WeightsMissing) as err:
        load_wav2lip(lipsync_settings(tmp_path, wav2lip_checkpoint="wav2lip"), "cpu")
    message = str(err.value)
    assert str(tmp_path / "wav2lip.pth") in message
    assert "lipserve weights fetch wav2lip.pth" in message
    assert err.value.status == 503


def test_missing_file_with_synthetic_allowed_gives_the_golden_weights(tmp_path, wav2lip_golden, caplog):
    # the synthetic rule is the one the goldens were made with, so even this path reproduces them
    with caplog.at_level("WARNING", logger="lipserve.weights"):
        net, synthetic = load_wav2lip(lipsync_settings(tmp_path, allow_synthetic_weights=True), "cpu")
    assert synthetic is True
    assert "SYNTHETIC WEIGHTS" in caplog.text
    out = _run(net, wav2lip_golden["mel"][:1], wav2lip_golden["face"][:1])
    np.testing.assert_allclose(out, wav2lip_golden["out"][:1], **golden_tolerance("wav2lip/golden.npz"))


# --- the audio front end -----------------------------------------------------------------------

def test_mel_spectrogram_equals_the_golden(wav2lip_audio_golden):
    mel = melspectrogram(wav2lip_audio_golden["wav"])
    assert mel.shape == (80, 161) and mel.dtype == np.float32
    np.testing.assert_allclose(mel, wav2lip_audio_golden["mel"], **golden_tolerance("wav2lip/golden_audio.npz"))


def test_mel_intermediates_equal_the_golden_extras(wav2lip_audio_golden):
    pre = preemphasize(wav2lip_audio_golden["wav"])
    assert pre.dtype == np.float64
    np.testing.assert_allclose(pre, wav2lip_audio_golden["preemphasized"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(mel_basis(), wav2lip_audio_golden["mel_basis"], rtol=1e-6, atol=1e-9)
    assert mel_basis() is mel_basis()  # built once


def test_edge_frames_use_reflect_padding(wav2lip_audio_golden):
    # the edges are where librosa >= 0.10's zero padding would differ (by up to 2.0)
    mel = melspectrogram(wav2lip_audio_golden["wav"])
    for column in (0, 1, -2, -1):
        np.testing.assert_allclose(mel[:, column], wav2lip_audio_golden["mel"][:, column], atol=1e-4, rtol=1e-4)


def test_stft_matches_librosa_reflect_on_an_odd_length_signal():
    # another input than the golden's: 1.3 s plus 123 samples of a chirp with noise
    rng = np.random.default_rng(7)
    t = np.arange(20_923) / 16000
    wav = (0.4 * np.sin(2 * np.pi * (200 + 900 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    pre = preemphasize(wav)
    ours = stft_magnitude(pre)
    reference = np.abs(librosa.stft(pre, n_fft=800, hop_length=200, win_length=800, window="hann",
                                    center=True, pad_mode="reflect"))
    assert ours.shape == reference.shape == (401, 1 + wav.size // 200)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    mel = melspectrogram(wav)
    assert mel.shape == (80, 1 + wav.size // 200)
    assert mel.min() >= -4 and mel.max() <= 4


def test_mel_rejects_unusable_audio():
    with pytest.raises(InvalidAudio):
        melspectrogram(np.zeros((2, 1600), np.float32))
    with pytest.raises(InvalidAudio):
        melspectrogram(np.array([0.0, np.nan, 0.0] * 200, np.float32))


def test_mel_chunk_starts_equal_the_golden_exactly(wav2lip_audio_golden):
    starts = mel_chunk_starts(161, 25)
    assert starts.dtype == np.int64
    np.testing.assert_array_equal(starts, wav2lip_audio_golden["mel_chunk_starts"])


def test_mel_chunks_are_the_windows_at_those_starts(wav2lip_audio_golden):
    mel = wav2lip_audio_golden["mel"]
    chunks = mel_chunks(mel, 25)
    assert chunks.shape == (47, 80, 16) and chunks.dtype == np.float32 and chunks.flags.c_contiguous
    for k, start in enumerate(wav2lip_audio_golden["mel_chunk_starts"]):
        np.testing.assert_array_equal(chunks[k], mel[:, start:start + 16])


def _stated_rule(n_frames: int, fps: float, step: int = 16) -> list[int]:
    """The chunking rule as the reference README states it, written out independently."""
    out, i = [], 0
    while int(i * 80. / fps) + step <= n_frames:
        out.append(int(i * 80. / fps))
        i += 1
    return out + [n_frames - step]


@pytest.mark.parametrize("fps", [30, 29.97, 30000 / 1001, 24, 24000 / 1001, 50, 60, 12.5])
@pytest.mark.parametrize("n_frames", [16, 17, 161, 240, 801, 2401])
def test_mel_chunk_starts_other_frame_rates(fps, n_frames):
    np.testing.assert_array_equal(mel_chunk_starts(n_frames, fps), _stated_rule(n_frames, fps))


def test_mel_chunk_starts_at_30_fps_by_hand():
    # 80/30 = 2.67 mel frames per video frame; the window at 24 is the last that fits in 40, then 24 again
    assert mel_chunk_starts(40, 30).tolist() == [0, 2, 5, 8, 10, 13, 16, 18, 21, 24, 24]


def test_mel_chunk_starts_refuse_too_short_speech_and_bad_fps():
    with pytest.raises(InvalidAudio, match="too short"):
        mel_chunk_starts(15, 25)
    with pytest.raises(InvalidMedia):
        mel_chunk_starts(161, 0)
    with pytest.raises(InvalidMedia):
        mel_chunk_starts(161, float("nan"))
