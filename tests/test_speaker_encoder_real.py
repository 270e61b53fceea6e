"""A real, trained speaker encoder through lipserve's own loader, speaker mel and encoder.

The PyPI package `resemblyzer` (a test dependency) ships `pretrained.pt`, a GE2E speaker encoder
trained on real voices, in exactly the file format and architecture of FreeVC's
`pretrained_bak_5805000.pt` (another training step: it is never served as FreeVC's encoder).
Given that file under FreeVC's name, lipserve must load it as a real checkpoint and its
embeddings must tell voices apart: two sentences of one voice closer than sentences of two voices.

The package's Python module is not imported (it pulls in webrtcvad, which needs pkg_resources);
only its data file is used, found through the installed distribution's file list.
"""
from __future__ import annotations

import itertools
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from lipserve.settings import Settings
from lipserve.tts.postprocess import finish
from lipserve.voice.loaders import SPEAKER_ENCODER_FILE, load_speaker_encoder
from lipserve.voice.speaker import embed_utterance

SENTENCES = ("The quick brown fox jumps over the lazy dog.",
             "Tomorrow we are going to visit my grandmother in the city.")


def resemblyzer_checkpoint() -> Path:
    try:
        dist = metadata.distribution("resemblyzer")
    except metadata.PackageNotFoundError:
        pytest.fail("resemblyzer is a test dependency (pip install -e '.[dev]'); its pretrained.pt is needed here")
    files = [f for f in dist.files or [] if str(f).endswith("resemblyzer/pretrained.pt")]
    assert files, "resemblyzer no longer ships resemblyzer/pretrained.pt"
    return Path(dist.locate_file(files[0]))


@pytest.fixture(scope="module")
def real_encoder(tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("real_speaker_encoder")
    (weights_dir / SPEAKER_ENCODER_FILE).symlink_to(resemblyzer_checkpoint())
    encoder, synthetic = load_speaker_encoder(Settings(weights_dir=weights_dir, device="cpu"))
    assert synthetic is False
    return encoder


@pytest.fixture(scope="module")
def two_voices(piper_engine, espeak_engine) -> dict[str, list[np.ndarray]]:
    """Each sentence from piper's en_US-joe voice and from espeak-ng, as the TTS stage delivers it (16 kHz)."""
    if not espeak_engine.available:
        pytest.fail(f"espeak-ng is needed for a second voice ({espeak_engine.unavailable_reason}); `make test` installs it")
    voices = {}
    for name, engine in (("piper", piper_engine), ("espeak", espeak_engine)):
        voice, language = engine.voice_for("en")
        voices[name] = [finish(engine.synthesize(text, voice, language, seed=i)) for i, text in enumerate(SENTENCES)]
    return voices


@pytest.mark.slow
def test_real_encoder_scores_one_voice_above_two_voices(real_encoder, two_voices):
    embeddings = {(name, i): embed_utterance(real_encoder, wav) for name, wavs in two_voices.items()
                  for i, wav in enumerate(wavs)}
    for embedding in embeddings.values():
        assert embedding.shape == (256,) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)
    same, different = [], []
    for (a, ea), (b, eb) in itertools.combinations(embeddings.items(), 2):
        (same if a[0] == b[0] else different).append(float(ea @ eb))
    print(f"cosine, same voice: {sorted(round(s, 3) for s in same)}; two voices: {sorted(round(d, 3) for d in different)}")
    # measured here: same voice 0.87-0.92 (piper), 0.82-0.91 (espeak); two voices 0.40-0.56. The gap needs
    # the trained weights, the loader, the speaker mel and the pooling of partial windows all to be right.
    assert min(same) > max(different) + 0.15
    assert min(same) > 0.75 and max(different) < 0.7
