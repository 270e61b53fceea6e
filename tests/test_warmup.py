"""Warm-up (issue 16): before the first request, every request path runs once on synthetic inputs,
so the first request pays no lazy import, JIT compile or first-run set-up of its own.

What is checked is that the paths really ran (which networks, at which Wav2Lip batch sizes, the
detector, the encoder, the reference-voice front end) and that a request after the warm-up
imports no module and compiles no numba function: never how long anything took.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devtools import testmedia
from lipserve import media
from lipserve.media.fragments import FIRST_FRAGMENT_FRAMES
from lipserve.pipeline import Pipeline
from lipserve.settings import Settings
from lipserve.voice import reference as reference_module

ROOT = Path(__file__).resolve().parents[1]


def _settings(root: Path, weights: Path, **extra) -> Settings:
    # WavLM from the 1-layer file of voice_small_wavlm_dir, the other networks synthetic
    return Settings(storage_root=root, weights_dir=weights, allow_synthetic_weights=True, tts_order=["piper"],
                    device="cpu", torch_threads=1, **extra)


@pytest.fixture(scope="module")
def unwarmed_pipeline(voice_small_wavlm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("warmup-root")
    # eager networks: the test sees each one run through torch's module hooks (the OpenVINO graphs
    # chosen by default on a CPU run outside torch; the no-new-import test below covers them)
    eager = {f"{name}_backend": "eager" for name in ("wavlm", "synthesizer", "wav2lip", "s3fd")}
    return Pipeline(_settings(root, voice_small_wavlm_dir, warmup=False, **eager))


class Calls:
    """Which modules ran (class name -> batch sizes of their first input) while installed."""

    def __init__(self):
        self.batches: dict[str, list[int]] = {}

    def __call__(self, module, args, output):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.batches.setdefault(type(module).__name__, []).append(int(first.shape[0]) if first is not None else -1)


@pytest.mark.slow
def test_warm_up_runs_every_request_path_and_leaves_the_caches_alone(unwarmed_pipeline, monkeypatch):
    pipeline = unwarmed_pipeline
    tts, voice, lipsync = pipeline.stages.tts, pipeline.stages.voice, pipeline.stages.lipsync
    assert pipeline.warm_up_report is None  # warmup=False: nothing ran at construction

    counted = {"engine": 0, "reference": 0, "detect": 0, "encode": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counted[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    piper = tts.engines["piper"]
    monkeypatch.setattr(piper, "synthesize", counting("engine", piper.synthesize))
    monkeypatch.setattr(reference_module, "prepare_reference", counting("reference", reference_module.prepare_reference))
    monkeypatch.setattr(lipsync.detector, "detect", counting("detect", lipsync.detector.detect))
    monkeypatch.setattr(media, "encode_mp4", counting("encode", media.encode_mp4))
    calls = Calls()
    handle = torch.nn.modules.module.register_module_forward_hook(calls)
    try:
        report = pipeline.warm_up()
    finally:
        handle.remove()

    assert set(report) == {"tts", "voice", "lipsync"}
    assert "piper:en-us" in report["tts"]
    assert {"reference_from_video", "reference_from_audio", "convert"} <= set(report["voice"])
    assert {"faces.auto", "faces.track"} <= set(report["lipsync"])
    assert any(path.startswith("sync.") and path.endswith(f"batch_{lipsync.batch_size()}") for path in report["lipsync"])

    assert counted["engine"] >= 1                  # the piper voice spoke (its ONNX session ran)
    assert counted["reference"] == 2               # from a video's track and from an audio file
    assert counted["detect"] >= 2                  # the default mode and track mode
    assert counted["encode"] == 1                  # the lip-synced mp4
    # every network ran: WavLM, the speaker encoder, SynthesizerTrn's decoder, Wav2Lip
    assert {"TransformerEncoder", "ConvFeatureExtractor", "SpeakerEncoder", "Generator", "Wav2Lip"} <= set(calls.batches)
    # Wav2Lip at both shapes every request uses: a full batch and a partial one
    sizes = set(calls.batches["Wav2Lip"])
    assert lipsync.batch_size() in sizes and any(0 < s < lipsync.batch_size() for s in sizes), sizes
    # and a streamed answer's first batch, a shape of its own
    assert f"stream.{FIRST_FRAGMENT_FRAMES + 1}_frames" in report["lipsync"]
    assert FIRST_FRAGMENT_FRAMES + 1 in sizes, sizes

    # nothing a request could later hit, nor any cache statistic, came from the warm-up
    assert tts.cache.stats()["size"] == 0 and tts.cache.stats()["misses"] == 0
    assert voice.speaker_cache.stats() == {"size": 0, "maxsize": voice.speaker_cache.maxsize, "hits": 0, "misses": 0}
    assert lipsync.face_cache.stats() == {"size": 0, "maxsize": lipsync.face_cache.maxsize, "hits": 0, "misses": 0}
    # the stages say they are warm
    assert tts.describe()["warm_up"] and voice.describe()["warm_up"] and lipsync.describe()["warm_up"]


class _Stage:
    """A stand-in stage that counts its warm-ups."""

    def __init__(self):
        self.warm_ups = 0

    def warm_up(self, seconds: float = 1.0, inputs=None) -> dict:
        assert inputs is not None and inputs.video and inputs.speech.size  # the shared synthetic clip
        self.warm_ups += 1
        return {"path": 0.0}

    def languages(self):
        return {"piper": ["en"]}


@pytest.mark.parametrize("setting, argument, warmed", [(True, None, 1), (False, None, 0), (True, False, 0),
                                                       (False, True, 1)])
def test_the_pipeline_warms_its_stages_when_asked(tmp_path, setting, argument, warmed):
    stages = {"tts": _Stage(), "voice": _Stage(), "lipsync": _Stage()}
    pipeline = Pipeline(Settings(storage_root=tmp_path, warmup=setting, warmup_seconds=0.5), storage=object(),
                        warm_up=argument, **stages)
    assert [s.warm_ups for s in stages.values()] == [warmed] * 3
    assert (pipeline.warm_up_report is not None) == bool(warmed)


def test_the_cli_does_not_warm_up_for_its_one_request(tmp_path, monkeypatch):
    from lipserve import cli, pipeline

    class Built(Exception):
        pass

    def record(settings, **kwargs):
        raise Built(kwargs)

    monkeypatch.setattr(pipeline, "Pipeline", record)
    source = tmp_path / "in.mp4"
    source.write_bytes(testmedia.astronaut_clip(seconds=1.0, fps=10, size=(160, 120), audio="speechlike"))
    with pytest.raises(Built) as built:
        cli.main(["run", "--video", str(source), "--text", "Hi", "--out", str(tmp_path / "out.mp4"),
                  "--synthetic-weights"])
    assert built.value.args[0]["warm_up"] is False


# A fresh interpreter: the stages are built, then warmed up, then one request runs. The warm-up must
# have imported modules (so the check below can catch a lazy import at all); the request must import
# none and compile no numba function.
CHILD = r'''
import json, sys
from pathlib import Path
from devtools import testmedia
from lipserve.contract import LipVideoRequest, RequestOptions
from lipserve.pipeline import Pipeline
from lipserve.settings import Settings

def numba_compiled():
    if "numba" not in sys.modules:
        return 0
    from numba.core.dispatcher import Dispatcher
    seen, total = set(), 0
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            if isinstance(value, Dispatcher) and id(value) not in seen:
                seen.add(id(value))
                total += len(value.overloads)
    return total

root, weights = Path(sys.argv[1]), Path(sys.argv[2])
(root / "src.mp4").write_bytes(testmedia.astronaut_clip(seconds=2.0, fps=25, size=(320, 240), audio="speechlike"))
settings = Settings(storage_root=root, weights_dir=weights, allow_synthetic_weights=True, tts_order=["piper"],
                    device="cpu", torch_threads=1, warmup=False, face_cache_size=0, speaker_cache_size=0,
                    tts_cache_size=0)
pipeline = Pipeline(settings)
before = set(sys.modules)
pipeline.warm_up()
warm_up_imported = sorted(set(sys.modules) - before)
compiled = numba_compiled()
before = set(sys.modules)
request = LipVideoRequest(word="First request.", user_video_gs="src.mp4", output_video_gs="out.mp4",
                          tts_lang="en", options=RequestOptions(face_mode="track"))
response = pipeline.run(request)
print("RESULT " + json.dumps({
    "warm_up_imported": warm_up_imported,
    "request_imported": sorted(set(sys.modules) - before),
    "compiled_before": compiled, "compiled_after": numba_compiled(),
    "duration_s": response.duration_s,
}))
'''


@pytest.mark.slow
def test_a_request_after_the_warm_up_imports_and_compiles_nothing_new(voice_small_wavlm_dir, tmp_path):
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(voice_small_wavlm_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["duration_s"] > 0.3
    # the warm-up is what paid the lazy imports (librosa's feature and effects modules, numba, ...)
    assert any(name.startswith("librosa.") for name in result["warm_up_imported"]), result["warm_up_imported"][:20]
    assert result["request_imported"] == []
    assert result["compiled_after"] == result["compiled_before"]


class _FakeEngine:
    """A TTSEngine stand-in: speaks a tone, or fails like a broken backend."""

    def __init__(self, name: str, languages: list[str], fails: bool = False, online: bool = False):
        self.name, self._languages, self.fails, self.online = name, languages, fails, online
        self.spoken: list[str] = []
        self.available, self.unavailable_reason = True, None

    def languages(self):
        return self._languages

    def warmup_languages(self):
        return self._languages

    def voice_for(self, language):
        return (f"{self.name}-{language}", language) if language in self._languages else None

    def synthesize(self, text, voice, language, seed=None):
        from lipserve.errors import TTSUnavailable
        from lipserve.tts import EngineAudio

        self.spoken.append(language)
        if self.fails:
            raise TTSUnavailable(f"{self.name}: backend down")
        return EngineAudio(samples=testmedia.speechlike(0.5, 16000), sample_rate=16000)

    def describe(self):
        return {}


def test_tts_warm_up_speaks_each_offline_voice_once_and_survives_a_failing_engine(tmp_path):
    from lipserve.tts import SpeechSynthesizer

    engines = {"piper": _FakeEngine("piper", ["en-us", "ko", "en-us"]), "espeak": _FakeEngine("espeak", ["af"], fails=True),
               "gtts": _FakeEngine("gtts", ["en"], online=True)}
    synth = SpeechSynthesizer(Settings(weights_dir=tmp_path, tts_order=["piper", "espeak", "gtts"]), engines=engines)
    report = synth.warm_up()
    assert engines["piper"].spoken == ["en-us", "ko"]   # each language (voice) once
    assert engines["gtts"].spoken == []                 # never the network
    assert engines["espeak"].spoken == ["af"] and len(report["failed"]) == 1 and "espeak:af" in report["failed"][0]
    assert {"piper:en-us", "piper:ko"} <= set(report)
    assert synth.cache.stats() == {"size": 0, "maxsize": synth.cache.maxsize, "hits": 0, "misses": 0}
