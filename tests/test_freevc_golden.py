"""SynthesizerTrn against the official FreeVC golden, loaded through our loader from official-format files."""
from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from lipserve.errors import WeightsMissing
from lipserve.models.freevc import SynthesizerTrn
from lipserve.models.freevc_configs import freevc_config
from lipserve.settings import Settings
from lipserve.voice.synthesizer import load_synthesizer, reference_mel
from lipserve.weights.formats import CheckpointFormatError, read_checkpoint, write_checkpoint
from lipserve.weights.synthetic import synthetic_state_dict

TOL = dict(rtol=1e-4, atol=1e-4)  # tests/reference/README.md, FreeVC out and intermediates


def settings_for(weights_dir, **overrides) -> Settings:
    return Settings(weights_dir=weights_dir, device="cpu", **overrides)


@pytest.fixture(scope="module")
def freevc_net(freevc_weights_dir):
    net, synthetic = load_synthesizer(settings_for(freevc_weights_dir), "cpu", "freevc")
    assert synthetic is False
    return net


@pytest.mark.parametrize("variant", ["freevc", "freevc-s", "freevc-24"])
def test_key_sets_and_shapes_equal_official_manifests(variant, freevc_manifests):
    state = SynthesizerTrn(freevc_config(variant)).state_dict()
    manifest = freevc_manifests[variant]
    assert list(state) == list(manifest)  # same keys, same (state_dict) order
    assert {k: tuple(v.shape) for k, v in state.items()} == manifest


def test_freevc_s_adds_exactly_the_enc_spk_keys(freevc_manifests):
    extra = set(freevc_manifests["freevc-s"]) - set(freevc_manifests["freevc"])
    assert len(extra) == 14 and all(k.startswith("enc_spk.") for k in extra)
    assert set(freevc_manifests["freevc"]) <= set(freevc_manifests["freevc-s"])


def test_official_file_layout_is_what_we_load(freevc_weights_dir):
    ckpt = read_checkpoint(freevc_weights_dir / "freevc.pth", "freevc")
    assert {"iteration", "learning_rate", "optimizer"} <= set(ckpt.extra)


def test_golden_noise_off(freevc_net, freevc_golden):
    c = torch.from_numpy(freevc_golden["c"])
    g = torch.from_numpy(freevc_golden["g"])
    with torch.inference_mode():
        steps = freevc_net.infer_steps(c, g=g, noise_scale=0.0)
    for name in ("z_p", "m_p", "logs_p", "z", "out"):
        assert steps[name].shape == freevc_golden[name].shape, name
        np.testing.assert_allclose(steps[name].numpy(), freevc_golden[name], **TOL, err_msg=name)
    # noise off: the prior sample is its mean (the mask is all ones here)
    assert torch.equal(steps["z_p"], steps["m_p"])


def test_golden_is_sensitive_to_the_speaker(freevc_net, freevc_golden):
    # guards against a network that ignores g and still lands near the golden
    c = torch.from_numpy(freevc_golden["c"])
    g = torch.from_numpy(np.roll(freevc_golden["g"], 7, axis=1))
    with torch.inference_mode():
        out = freevc_net.infer(c, g=g, noise_scale=0.0).numpy()
    assert np.abs(out - freevc_golden["out"]).max() > 1e-2


def test_noise_on_varies_run_to_run_noise_off_is_identical(freevc_net, freevc_golden):
    c = torch.from_numpy(freevc_golden["c"][..., :16])  # a short input keeps six runs cheap
    g = torch.from_numpy(freevc_golden["g"])
    with torch.inference_mode():
        a, b = (freevc_net.infer(c, g=g) for _ in range(2))  # default: the official random sampling
        d, e = (freevc_net.infer(c, g=g, noise_scale=0.0) for _ in range(2))
        s1 = freevc_net.infer(c, g=g, generator=torch.Generator().manual_seed(3))
        s2 = freevc_net.infer(c, g=g, generator=torch.Generator().manual_seed(3))
    assert (a - b).abs().max() > 1e-2
    assert (a - d).abs().max() > 1e-2
    assert torch.equal(d, e)
    assert torch.equal(s1, s2)


def test_freevc_24_same_weights_gives_24khz_length(freevc_weights_dir, freevc_golden):
    net, synthetic = load_synthesizer(settings_for(freevc_weights_dir), "cpu", "freevc-24")
    assert not synthetic and net.cfg.output_hop == 480 and net.cfg.output_sample_rate == 24000
    with torch.inference_mode():
        out = net.infer(torch.from_numpy(freevc_golden["c"]), g=torch.from_numpy(freevc_golden["g"]), noise_scale=0.0)
    assert out.shape == (1, 1, 40 * 480)
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0
    # the prior and flow are the same network as FreeVC's, only the generator's strides differ
    assert out.std() > 1e-3


def test_freevc_s_infers_from_a_reference_mel(freevc_weights_dir, freevc_golden, reference_3s):
    net, synthetic = load_synthesizer(settings_for(freevc_weights_dir), "cpu", "freevc-s")
    assert not synthetic and not net.use_spk
    mel = reference_mel(torch.from_numpy(reference_3s)[None], net.cfg)
    assert mel.shape == (1, 80, 3 * 16000 // 320)
    c = torch.from_numpy(freevc_golden["c"])
    with torch.inference_mode():
        out = net.infer(c, mel=mel, noise_scale=0.0)
        g = net.speaker_vector(mel=mel)
        out_g = net.infer(c, g=g, noise_scale=0.0)
    assert out.shape == (1, 1, 12800) and torch.isfinite(out).all()
    assert torch.equal(out, out_g)  # a cached speaker vector gives what the mel path gives
    # mean of unit vectors over windows: norm at most 1, and the windows do differ
    assert g.shape == (1, 256) and 0.5 < float(g.norm()) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="mel"):
        net.infer(c)


def test_freevc_needs_g(freevc_net, freevc_golden):
    with pytest.raises(ValueError, match="no mel speaker encoder"):
        freevc_net.infer(torch.from_numpy(freevc_golden["c"]), mel=torch.zeros(1, 80, 200))


def test_reference_mel_matches_a_librosa_computation(reference_3s):
    cfg = freevc_config("freevc-s")
    ours = reference_mel(torch.from_numpy(reference_3s)[None], cfg)[0].numpy()
    pad = (cfg.filter_length - cfg.hop_length) // 2
    padded = np.pad(reference_3s.astype(np.float64), pad, mode="reflect")
    spec = librosa.stft(padded, n_fft=cfg.filter_length, hop_length=cfg.hop_length, win_length=cfg.win_length,
                        window="hann", center=False)
    magnitude = np.sqrt(np.abs(spec) ** 2 + 1e-6)
    basis = librosa.filters.mel(sr=16000, n_fft=cfg.filter_length, n_mels=80, fmin=0.0, fmax=None)
    expected = np.log(np.maximum(basis @ magnitude, 1e-5))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-3)


def test_missing_file_names_it_and_the_fetch_command(tmp_path):
    with pytest.raises(WeightsMissing) as info:
        load_synthesizer(settings_for(tmp_path), "cpu", "freevc-24")
    assert "freevc-24.pth" in info.value.message and "lipserve weights fetch" in info.value.message


def test_synthetic_weights_when_allowed_equal_the_detinit_rule(tmp_path, freevc_manifests):
    net, synthetic = load_synthesizer(settings_for(tmp_path, allow_synthetic_weights=True), "cpu", "freevc")
    assert synthetic is True
    expected = synthetic_state_dict({k: freevc_manifests["freevc"][k] for k in ["dec.ups.0.weight_g", "flow.flows.6.post.bias"]})
    for key, value in expected.items():
        assert torch.equal(net.state_dict()[key], value)


def test_wrong_variant_file_is_rejected_naming_the_difference(tmp_path, freevc_manifests):
    # a FreeVC file where FreeVC-s is expected: the 14 enc_spk keys are missing
    write_checkpoint(tmp_path / "freevc-s.pth", "freevc", synthetic_state_dict(freevc_manifests["freevc"]))
    with pytest.raises(CheckpointFormatError, match="14 missing"):
        load_synthesizer(settings_for(tmp_path), "cpu", "freevc-s")
