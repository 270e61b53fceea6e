"""The fast paths (lipserve.fast: fp32 OpenVINO graphs) stay within their bounds of the fp32 eager path.

Bounds (lipserve.fast.BOUNDS): Wav2Lip mean abs <= 1/255 of its [0, 1] output; WavLM every frame's
cosine >= 0.999; the synthesizer's waveform >= 30 dB SNR (noise off, and the same seeded noise);
S3FD every raw output within 1e-4 of its scale. Each is held on the golden inputs (whose weights
are the synthetic detinit ones the goldens were made with) and on inputs made from the test clip.
The eager modules remain what the golden tests test; these tests compare the graphs to them.

Synthetic weights are not trained weights: a graph that is exact to float32 rounding (what
OpenVINO's fp32 CPU plugin gives) keeps its error whatever the weights, but the load-time check
(fast.backend) re-measures each bound with the weights actually loaded, and falls back to eager.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from devtools import testmedia
from lipserve.audio.wav2lip_mel import melspectrogram
from lipserve.fast import BOUNDS, backend
from lipserve.fast import networks as fast_networks
from lipserve.fast.networks import (FastS3FD, FastSynthesizer, FastWav2Lip, FastWavLM, frame_cosine_min, mean_abs,
                                    relative_max_abs, snr_db)
from lipserve.lipsync import blend
from lipserve.lipsync.networks import load_s3fd, load_wav2lip
from lipserve.models.wavlm import WavLM
from lipserve.voice.loaders import load_wavlm
from lipserve.voice.synthesizer import load_synthesizer
from tests.fixtures.lipsync_networks import lipsync_settings
from tests.fixtures.voice_encoders import voice_settings

THREADS = 2

def _bound(network: str) -> float:
    return BOUNDS[network][1]

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino_cache")

# ----------------------------------------------------------------------------- Wav2Lip

@pytest.fixture(scope="module")
def wav2lip_pair(official_lipsync_weights_dir, cache_dir):
    net, _ = load_wav2lip(lipsync_settings(official_lipsync_weights_dir), "cpu")
    return net, FastWav2Lip(net, THREADS, cache_dir)

def _run_pair(pair, mel, face):
    net, fast = pair
    mel, face = torch.from_numpy(np.ascontiguousarray(mel)), torch.from_numpy(np.ascontiguousarray(face))
    with torch.inference_mode():
        return fast(mel, face), net(mel, face)

def test_wav2lip_graph_on_the_golden_inputs(wav2lip_pair, wav2lip_golden):
    fast, eager = _run_pair(wav2lip_pair, wav2lip_golden["mel"], wav2lip_golden["face"])
    assert fast.shape == eager.shape == (2, 3, 96, 96) and fast.dtype == torch.float32
    assert mean_abs(fast, eager) <= _bound("wav2lip")
    assert mean_abs(fast, torch.from_numpy(wav2lip_golden["out"])) <= _bound("wav2lip")
    # in 8-bit pixels (what reaches the video) hardly a level moves
    levels = (fast * 255).round() - (eager * 255).round()
    assert float(levels.abs().max()) <= 1.0

def test_wav2lip_graph_on_crops_of_the_test_clip(wav2lip_pair):
    # 21 frames: a full batch size the syncer uses (16) and a smaller last batch, both through one graph
    from lipserve import media

    clip = testmedia.astronaut_clip(seconds=1.0, fps=25, size=(640, 360), audio=None)
    frames = media.decode_frames(clip, count=21)
    crops = []
    for i, frame in enumerate(frames):
        x1, y1, x2, y2 = testmedia.face_box_truth(i, fps=25, size=(640, 360))
        crops.append(frame[y1:min(frame.shape[0], y2 + 20), x1:x2])
    faces = blend.crops_to_model_input_np(crops).numpy()
    mel = melspectrogram(testmedia.speechlike(1.0, 16000, seed=3))
    starts = np.linspace(0, mel.shape[1] - 16, len(crops)).astype(int)
    mels = np.stack([mel[:, s:s + 16] for s in starts])[:, None].astype(np.float32)
    for lo, hi in ((0, 16), (16, 21)):
        fast, eager = _run_pair(wav2lip_pair, mels[lo:hi], faces[lo:hi])
        assert fast.shape == (hi - lo, 3, 96, 96)
        assert mean_abs(fast, eager) <= _bound("wav2lip"), (lo, hi)

# ----------------------------------------------------------------------------- WavLM

def test_wavlm_graph_on_the_golden_inputs_any_length(wavlm_small_weights_dir, wavlm_golden, cache_dir):
    model, _ = load_wavlm(voice_settings(wavlm_small_weights_dir), "cpu")
    fast = FastWavLM(model, THREADS, cache_dir)  # traced at 1 s; the long golden is 3 s
    with torch.inference_mode():
        for wav_key, out_key in (("wav", "out"), ("wav_long", "out_long")):
            wav = torch.from_numpy(wavlm_golden[wav_key])[None]
            features = fast.extract_features(wav)
            eager = model.extract_features(wav)
            assert features.shape == eager.shape == wavlm_golden[out_key].shape
            assert frame_cosine_min(features, eager) >= _bound("wavlm")
            assert frame_cosine_min(features, torch.from_numpy(wavlm_golden[out_key])) >= _bound("wavlm")
        # the converter's windowed path for long speech runs the graph per window
        wav = torch.from_numpy(wavlm_golden["wav_long"])[None]
        windowed = model.extract_features_chunked(wav, chunk_frames=40, context_frames=20, extract=fast.extract_features)
        reference = model.extract_features_chunked(wav, chunk_frames=40, context_frames=20)
        assert frame_cosine_min(windowed, reference) >= _bound("wavlm")

@pytest.mark.slow
def test_wavlm_large_graph_on_two_seconds_of_speech(tmp_path, cache_dir):
    # the full WavLM-Large (24 layers, 1024 wide) on its synthetic weights: the bound over depth
    model, synthetic = load_wavlm(voice_settings(tmp_path, allow_synthetic_weights=True), "cpu")
    assert synthetic
    fast = FastWavLM(model, THREADS, cache_dir)
    wav = torch.from_numpy(testmedia.speechlike(2.0, 16000, seed=11))[None]
    with torch.inference_mode():
        assert frame_cosine_min(fast.extract_features(wav), model.extract_features(wav)) >= _bound("wavlm")

# ----------------------------------------------------------------------------- SynthesizerTrn

@pytest.mark.parametrize("variant", ["freevc", "freevc-s", "freevc-24"])
def test_synthesizer_graph_on_the_golden_inputs(variant, freevc_weights_dir, freevc_golden, cache_dir):
    net, _ = load_synthesizer(voice_settings(freevc_weights_dir), "cpu", variant)
    fast = FastSynthesizer(net, THREADS, cache_dir)
    c, g = torch.from_numpy(freevc_golden["c"]), torch.from_numpy(freevc_golden["g"])
    with torch.inference_mode():
        out = fast.infer(c, g, noise_scale=0.0)
        eager = net.infer(c, g=g, noise_scale=0.0)
        assert out.shape == eager.shape
        assert snr_db(out, eager) >= _bound("synthesizer")
        if variant == "freevc":  # the golden is FreeVC's noise-off output
            assert snr_db(out, freevc_golden["out"]) >= _bound("synthesizer")
        # noise on: the same seed gives the same draw on both paths, so the outputs still match
        noisy = fast.infer(c, g, noise_scale=1.0, generator=torch.Generator().manual_seed(7))
        noisy_eager = net.infer(c, g=g, noise_scale=1.0, generator=torch.Generator().manual_seed(7))
        assert snr_db(noisy, noisy_eager) >= _bound("synthesizer")
        assert snr_db(noisy, out) < 30.0  # and the noise really was applied
        # another length than the traced one, and half the noise scale
        c_long = torch.cat([c, c.flip(-1)], dim=-1)
        half = fast.infer(c_long, g, noise_scale=0.5, generator=torch.Generator().manual_seed(8))
        half_eager = net.infer(c_long, g=g, noise_scale=0.5, generator=torch.Generator().manual_seed(8))
        assert half.shape[-1] == 2 * eager.shape[-1]
        assert snr_db(half, half_eager) >= _bound("synthesizer")

# ----------------------------------------------------------------------------- S3FD

def test_s3fd_graph_on_the_golden_input_and_a_clip_frame(official_lipsync_weights_dir, s3fd_golden, cache_dir):
    from lipserve import media

    net = load_s3fd(lipsync_settings(official_lipsync_weights_dir), "cpu")
    fast = FastS3FD(net, THREADS, cache_dir)
    frame = media.decode_frames(testmedia.astronaut_clip(seconds=0.2, fps=25, size=(320, 180), audio=None), count=1)
    x_clip = torch.from_numpy(frame.astype(np.float32)).permute(0, 3, 1, 2) - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    with torch.inference_mode():
        for x in (torch.from_numpy(s3fd_golden["x"]), x_clip.contiguous()):
            outs, eager = fast(x), list(net(x))
            assert [o.shape for o in outs] == [e.shape for e in eager]
            assert relative_max_abs(outs, eager) <= _bound("s3fd")

# ----------------------------------------------------------------------------- choosing, caching

def test_auto_uses_eager_off_the_cpu_and_when_asked(monkeypatch):
    assert backend.resolve_backend("auto", "cuda", "wav2lip")[0] == "eager"
    assert backend.resolve_backend("eager", "cpu", "wav2lip")[0] == "eager"
    assert backend.resolve_backend("auto", "cpu", "wav2lip")[0] == "openvino"
    monkeypatch.setattr(backend, "openvino_installed", lambda: False)
    backend_name, reason = backend.resolve_backend("auto", "cpu", "wav2lip")
    assert backend_name == "eager" and "not installed" in reason
    with pytest.raises(RuntimeError, match="openvino"):
        backend.resolve_backend("openvino", "cpu", "wav2lip")
    with pytest.raises(ValueError):
        backend.resolve_backend("fastest", "cpu", "wav2lip")

def test_a_fast_path_that_misses_its_bound_falls_back_to_eager_unless_forced():
    eager, fast = object(), object()

    def missing(_):
        return "mean abs", 0.5, 1 / 255, False

    runner, report = backend.choose("wav2lip", "auto", "cpu", eager, lambda: fast, missing)
    assert runner is eager and report.backend == "eager" and "missed its bound" in report.reason
    runner, report = backend.choose("wav2lip", "openvino", "cpu", eager, lambda: fast, missing)
    assert runner is fast and report.backend == "openvino" and "misses the bound" in report.reason
    runner, report = backend.choose("wav2lip", "auto", "cpu", eager, lambda: fast, lambda _: ("mean abs", 0.0, 1.0, True))
    assert runner is fast and report.measured == 0.0

def test_the_stage_loaders_pick_the_graph_and_report_it(official_lipsync_weights_dir, cache_dir):
    from lipserve.lipsync import LipSyncer

    syncer = LipSyncer(lipsync_settings(official_lipsync_weights_dir, fast_cache_dir=cache_dir))
    paths = syncer.describe()["fast_paths"]
    assert paths["wav2lip"]["backend"] == "openvino" and paths["wav2lip"]["measured"] <= _bound("wav2lip")
    assert paths["s3fd"]["backend"] == "openvino"
    assert isinstance(syncer.lip_model, FastWav2Lip)
    eager = LipSyncer(lipsync_settings(official_lipsync_weights_dir, wav2lip_backend="eager", s3fd_backend="eager"))
    assert eager.lip_model is eager.model and eager.describe()["fast_paths"]["wav2lip"]["backend"] == "eager"

def test_converted_graphs_are_cached_by_weights(tmp_path):
    net = WavLM({"encoder_layers": 1, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 4,
                 "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", "conv_pos": 16,
                 "conv_pos_groups": 4, "relative_position_embedding": True, "gru_rel_pos": True}).eval()
    first = FastWavLM(net, 1, tmp_path)
    second = FastWavLM(net, 1, tmp_path)
    assert not first.graph.from_cache and second.graph.from_cache
    wav = torch.from_numpy(testmedia.speechlike(0.5, 16000, seed=2))[None]
    np.testing.assert_array_equal(first.extract_features(wav).numpy(), second.extract_features(wav).numpy())
    with torch.no_grad():
        net.encoder.layers[0].fc1.weight.mul_(2.0)  # other weights: another key, a fresh conversion
    third = FastWavLM(net, 1, tmp_path)
    assert not third.graph.from_cache
    with torch.inference_mode():
        assert frame_cosine_min(third.extract_features(wav), net.extract_features(wav)) >= _bound("wavlm")
    assert len(list(tmp_path.iterdir())) == 2

def test_graphs_fed_a_new_shape_per_request_keep_no_shape_specific_kernels(tmp_path):
    # speech lengths and frame sizes change per request: a kernel cache would only grow (~18 MiB per
    # WavLM-Large conversion before this); Wav2Lip's few batch shapes keep the plugin's default cache
    net = WavLM({"encoder_layers": 1, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 32, "encoder_attention_heads": 2,
                 "conv_feature_layers": "[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2", "conv_pos": 8,
                 "conv_pos_groups": 2}).eval()
    fast = FastWavLM(net, 1, None)
    assert fast.graph.config["CPU_RUNTIME_CACHE_CAPACITY"] == 0
    for seconds in (0.3, 0.45, 0.6):  # and it still serves each new length
        wav = torch.from_numpy(testmedia.speechlike(seconds, 16000, seed=3))[None]
        with torch.inference_mode():
            assert frame_cosine_min(fast.extract_features(wav), net.extract_features(wav)) >= _bound("wavlm")


def test_wav2lip_keeps_the_default_kernel_cache(wav2lip_pair):
    _, fast = wav2lip_pair
    assert "CPU_RUNTIME_CACHE_CAPACITY" not in fast.graph.config


def test_error_measures():
    a = torch.ones(3, 4)
    assert frame_cosine_min(a, a) == pytest.approx(1.0)
    assert frame_cosine_min(a, -a) == pytest.approx(-1.0)
    assert snr_db(np.ones(10), np.ones(10)) == float("inf")
    assert snr_db(np.ones(10) * 1.1, np.ones(10)) == pytest.approx(20.0)
    assert mean_abs(torch.zeros(4), torch.ones(4)) == 1.0
    assert relative_max_abs([torch.zeros(2)], [torch.full((2,), 4.0)]) == 1.0
    assert fast_networks.within("synthesizer", 31.0) and not fast_networks.within("synthesizer", float("nan"))
