"""Speech padded up a short ladder of lengths for the CPU graphs (lipserve.fast.networks): the
padding is masked so the real part is what the unpadded input gives, and a graph sees few shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from devtools import testmedia
from lipserve.fast.networks import (BOUNDS, CONTENT_STEP_FRAMES, SPEECH_STEP_SAMPLES, FastSynthesizer, FastWavLM,
                                    bucketed, frame_cosine_min, snr_db)
from lipserve.voice.loaders import load_wavlm
from lipserve.voice.synthesizer import load_synthesizer
from tests.fixtures.voice_encoders import voice_settings


def test_the_ladder_has_few_lengths_and_pads_little():
    sizes = range(1, 16000 * 31, 97)
    lengths = [bucketed(n, SPEECH_STEP_SAMPLES) for n in sizes]
    assert all(b >= n and b % SPEECH_STEP_SAMPLES == 0 for b, n in zip(lengths, sizes))
    assert len({b for b in lengths if b <= 16000 * 10.4}) == 20 and len({b for b in lengths if b <= 16000 * 30.2}) == 26
    assert all(b - n <= max(SPEECH_STEP_SAMPLES, 0.2 * n) for b, n in zip(lengths, sizes))
    assert [bucketed(n, CONTENT_STEP_FRAMES) for n in (1, 10, 11, 87)] == [10, 10, 20, 90]


def test_wavlm_padding_is_masked_exactly(wavlm_small_weights_dir):
    model, _ = load_wavlm(voice_settings(wavlm_small_weights_dir), "cpu")
    wav = torch.from_numpy(testmedia.speechlike(1.37, 16000, seed=5))[None]
    frames = model.feature_extractor.n_frames(wav.shape[-1])
    padded = torch.nn.functional.pad(wav, (0, bucketed(wav.shape[-1], SPEECH_STEP_SAMPLES) - wav.shape[-1]))
    with torch.inference_mode():
        plain = model.extract_features(wav)
        masked = model.extract_features(padded, n_frames=torch.tensor([frames]))[:, :frames]
        unmasked = model.extract_features(padded)[:, :frames]
    assert masked.shape == plain.shape
    assert float((masked - plain).abs().max()) <= 1e-5 * float(plain.abs().max())
    # without the mask the real frames attend to the padding: the mask is what makes it exact
    assert float((unmasked - plain).abs().max()) > 1e-3 * float(plain.abs().max())


@pytest.mark.parametrize("variant", ["freevc", "freevc-24"])
def test_synthesizer_padding_is_masked_exactly_decoder_included(variant, freevc_weights_dir, freevc_golden):
    net, _ = load_synthesizer(voice_settings(freevc_weights_dir), "cpu", variant)
    c, g = torch.from_numpy(freevc_golden["c"]), torch.from_numpy(freevc_golden["g"])
    frames = c.shape[-1]
    padded = torch.nn.functional.pad(c, (0, 13))  # as up to the next rung
    with torch.inference_mode():
        plain = net.infer(c, g=g, noise_scale=0.0)
        masked = net.infer(padded, g=g, c_lengths=torch.tensor([frames]), noise_scale=0.0)[..., :plain.shape[-1]]
        # the prior and flow masked, the decoder not (upstream's decoder): its tail sees the padding
        steps = net.infer_steps(padded, g=g, c_lengths=torch.tensor([frames]), noise_scale=0.0)
        tail_unmasked = net.dec(steps["z"], g=g.unsqueeze(-1))[..., :plain.shape[-1]]
    assert snr_db(masked, plain) >= 90.0
    assert snr_db(tail_unmasked, plain) < 60.0


def test_the_graphs_see_ladder_lengths_only_and_keep_their_bounds(wavlm_small_weights_dir, freevc_weights_dir,
                                                                   freevc_golden, tmp_path):
    wavlm, _ = load_wavlm(voice_settings(wavlm_small_weights_dir), "cpu")
    net, _ = load_synthesizer(voice_settings(freevc_weights_dir), "cpu", "freevc")
    fast_wavlm, fast_synth = FastWavLM(wavlm, 2, tmp_path), FastSynthesizer(net, 2, tmp_path)
    assert fast_wavlm.pads
    seen: dict[str, set] = {"wavlm": set(), "synth": set()}

    def recording(graph, key):
        def call(*inputs):
            seen[key].add(tuple(inputs[0].shape))
            return graph(*inputs)
        return call

    fast_wavlm.graph = recording(fast_wavlm.graph, "wavlm")
    fast_synth.noiseless = recording(fast_synth.noiseless, "synth")
    g = torch.from_numpy(freevc_golden["g"])
    rng = np.random.default_rng(2)
    with torch.inference_mode():
        for seconds in (1.63, 1.68, 1.72, 1.77):  # four lengths, one rung of the ladder
            wav = torch.from_numpy(testmedia.speechlike(seconds, 16000, seed=int(seconds * 100)))[None]
            features = fast_wavlm.extract_features(wav)
            eager = wavlm.extract_features(wav)
            assert features.shape == eager.shape
            assert frame_cosine_min(features, eager) >= BOUNDS["wavlm"][1]
            c = torch.from_numpy(rng.standard_normal((1, net.cfg.ssl_dim, eager.shape[1])).astype(np.float32))
            out, out_eager = fast_synth.infer(c, g, noise_scale=0.0), net.infer(c, g=g, noise_scale=0.0)
            assert out.shape == out_eager.shape
            assert snr_db(out, out_eager) >= BOUNDS["synthesizer"][1]
    assert seen == {"wavlm": {(1, 28800)}, "synth": {(1, net.cfg.ssl_dim, 90)}}
