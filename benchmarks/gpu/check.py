"""The one-shot device check: every GPU figure lipserve needs, in one run, into one report.

Sections (each guarded: a failure is written into the report and the next section runs; a global
time budget stops measuring before the box is taken back, and the report is rewritten after
every section, so whatever ran is there even if the process is killed):

  environment   python, torch, CUDA device, PyAV codecs
  networks      Wav2Lip, S3FD, WavLM-Large, SynthesizerTrn at several batch sizes in fp32 / fp16 /
                bf16 (autocast, as the stages run them): time per item, peak GPU memory, max/mean
                difference against fp32 (SYNTHETIC WEIGHTS: the numbers are speed and numerics only)
  pipeline      the in-process pipeline (no Ray) on the 10 s 640x360 clip with 2 s and 10 s of speech
                made on the build machine (TTS is not a GPU stage: a carried wav stands in for it):
                cold, warm with a new video, warm with the same video; per-stage times, time to
                the first output frame, output frames per second
  memory        each GPU stage's peak memory alone, against its GPU share in serve_config.yaml,
                on a 16 GB T4, a 24 GB L4 and an 80 GB H100
  throughput    1, 4, 16 concurrent requests in one process, cross-request batching on and off
  oom           the memory cap on a real card: a Wav2Lip call far over a low cap splits and succeeds
  encode        the output's H.264 encode: libx264 (what lipserve uses) against h264_nvenc

Usage (see benchmarks/gpu/README.md):  benchmarks/gpu/run.sh [--device cuda|cpu] [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_inputs

import numpy as np  # noqa: E402 - after the path set-up
import torch  # noqa: E402

GIB = 2**30
MIB = 2**20
CARDS_GB = {"T4": 16, "L4": 24, "H100": 80}
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
SYNTHETIC = "SYNTHETIC WEIGHTS (deterministic, not trained): figures are speed, memory and numerics, not quality"


# ============================================================================ the report

class Report:
    """Sections in order; markdown + JSON rewritten after every section (at most 3 files)."""

    def __init__(self, out: Path, budget_s: float, args: argparse.Namespace):
        self.out = out
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.args = args
        self.sections: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn, *, needs_s: float) -> None:
        section = {"name": name, "status": "ok", "seconds": 0.0, "tables": [], "notes": [], "data": {}}
        self.sections.append(section)
        if self.remaining() < needs_s:
            section["status"] = "skipped"
            section["notes"].append(f"skipped: {self.remaining():.0f} s of the {self.budget_s:.0f} s budget left, "
                                    f"this section needs about {needs_s:.0f} s")
            self.write()
            return
        start = time.perf_counter()
        print(f"== {name} ({self.remaining():.0f} s of budget left)", flush=True)
        try:
            fn(Section(self, section))
        except Exception as exc:  # noqa: BLE001 - recorded in the report; the next section still runs
            section["status"] = "failed"
            section["error"] = f"{type(exc).__name__}: {exc}"
            section["traceback"] = traceback.format_exc()
            print(section["traceback"], file=sys.stderr, flush=True)
        finally:
            section["seconds"] = round(time.perf_counter() - start, 2)
            if _cuda():
                torch.cuda.empty_cache()
            self.write()

    def write(self) -> None:
        data = {"args": vars(self.args) | {"out": str(self.args.out)}, "budget_s": self.budget_s,
                "elapsed_s": round(time.perf_counter() - self.t0, 2), "sections": self.sections}
        (self.out / "report.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "report.md").write_text(self.markdown(data))

    def markdown(self, data: dict) -> str:
        lines = ["# lipserve device check", "",
                 f"device `{self.args.device}`, quick {self.args.quick}, budget {self.budget_s:.0f} s, "
                 f"elapsed {data['elapsed_s']:.0f} s", "", f"**{SYNTHETIC}.**", ""]
        lines += ["| section | status | seconds |", "| --- | --- | --- |"]
        lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in self.sections]
        for s in self.sections:
            lines += ["", f"## {s['name']} ({s['status']})", ""]
            if s.get("error"):
                lines += [f"**failed**: `{s['error']}`", "", "```", s.get("traceback", "").strip()[-3000:], "```", ""]
            for note in s["notes"]:
                lines += [f"- {note}"]
            for table in s["tables"]:
                lines += ["", f"**{table['title']}**", "", "| " + " | ".join(table["header"]) + " |",
                          "|" + " --- |" * len(table["header"])]
                lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table["rows"]]
        return "\n".join(lines) + "\n"


class Section:
    def __init__(self, report: Report, record: dict):
        self.report, self.record = report, record

    def note(self, text: str) -> None:
        print(f"   {text}", flush=True)
        self.record["notes"].append(text)

    def table(self, title: str, header: list[str], rows: list[list]) -> None:
        self.record["tables"].append({"title": title, "header": header, "rows": rows})
        print(f"   {title}: {len(rows)} rows", flush=True)

    def remaining(self) -> float:
        return self.report.remaining()

    def __setitem__(self, key, value):
        self.record["data"][key] = value


def _cell(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 0.01:
            return f"{v:.3g}"
        return f"{v:.2e}"
    return "" if v is None else str(v)


# ============================================================================ helpers

def _cuda() -> bool:
    return torch.cuda.is_available()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def timed(fn, device: torch.device, *, reps: int, warmup: int = 1) -> tuple[float, object]:
    """(median seconds of `reps` calls after `warmup`, last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak_bytes(fn, device: torch.device) -> tuple[int | None, object]:
    """(peak allocated bytes above what was allocated before the call, output) on CUDA; None on CPU."""
    if device.type != "cuda":
        return None, fn()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base, out


def flat(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.float().reshape(-1)
    return torch.cat([o.float().reshape(-1) for o in output])


def diff(out, ref) -> tuple[float, float, int]:
    """(max |out - ref|, mean |out - ref|, non-finite values in out) over the finite values."""
    a, b = flat(out), flat(ref)
    bad = int((~torch.isfinite(a)).sum())
    ok = torch.isfinite(a) & torch.isfinite(b)
    d = (a[ok] - b[ok]).abs()
    return (float(d.max()) if d.numel() else float("nan")), (float(d.mean()) if d.numel() else float("nan")), bad


def mib(n) -> float | None:
    return None if n is None else n / MIB


def serve_shares() -> dict[str, float]:
    """GPU share per deployment in serve_config.yaml."""
    import yaml

    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return {d["name"]: float(d.get("ray_actor_options", {}).get("num_gpus", 0))
            for d in cfg["applications"][0]["deployments"]}


# ============================================================================ environment

def environment(s: Section, args) -> None:
    import importlib

    s["python"] = sys.version.split()[0]
    s["torch"] = torch.__version__
    s["cuda_available"] = _cuda()
    rows = [["python", sys.version.split()[0]], ["platform", platform.platform()], ["torch", torch.__version__],
            ["cpu cores", os.cpu_count()], ["torch threads", torch.get_num_threads()]]
    if _cuda():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        rows += [["gpu", props.name], ["gpu memory GiB", total / GIB], ["free GiB", free / GIB],
                 ["compute capability", f"{props.major}.{props.minor}"], ["torch CUDA", torch.version.cuda],
                 ["cuDNN", torch.backends.cudnn.version()], ["bf16 supported", torch.cuda.is_bf16_supported()]]
        s["gpu"] = props.name
        s["gpu_total_bytes"] = total
    for name in ("av", "pydantic", "pydantic_settings", "librosa", "soundfile", "soxr", "cv2", "scipy", "numba",
                 "onnxruntime", "yaml"):
        try:
            module = importlib.import_module(name)
            rows.append([name, getattr(module, "__version__", "?")])
        except Exception as exc:  # noqa: BLE001 - an import that fails is a finding
            rows.append([name, f"NOT IMPORTABLE: {type(exc).__name__}: {exc}"])
    try:
        import av

        codecs = av.codecs_available
        rows.append(["h264 encoders in PyAV", ", ".join(c for c in ("libx264", "h264_nvenc", "hevc_nvenc", "aac")
                                                         if c in codecs)])
    except ImportError as exc:
        rows.append(["PyAV", f"NOT IMPORTABLE: {exc}"])
    try:
        commit = (ROOT / ".git").exists() and os.popen(f"git -C {ROOT} rev-parse --short HEAD 2>/dev/null").read().strip()
        rows.append(["lipserve commit", commit or "unknown (no .git)"])
    except OSError as exc:
        rows.append(["lipserve commit", f"unknown ({exc})"])
    s.table("environment", ["what", "value"], rows)


# ============================================================================ networks

def _networks(quick: bool, device: torch.device):
    """[(name, build(), make_inputs(batch), forward(model, inputs), batch sizes, item unit)]."""
    from lipserve.models.freevc import SynthesizerTrn
    from lipserve.models.freevc_configs import freevc_config
    from lipserve.models.s3fd import S3FD
    from lipserve.models.wav2lip import Wav2Lip
    from lipserve.models.wavlm import WavLM
    from lipserve.voice.loaders import wavlm_large_config
    from lipserve.weights.synthetic import fill_synthetic

    def ready(net, channels_last=False):
        if any(p.is_meta for p in net.parameters()):
            net = net.to_empty(device="cpu")  # every tensor is overwritten next: skip the random init
        net = fill_synthetic(net).eval().requires_grad_(False)
        return net.to(device=device, memory_format=torch.channels_last) if channels_last else net.to(device)

    def meta(cls, *args):
        with torch.device("meta"):
            return cls(*args)

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.rand(*shape, generator=gen) * scale + offset).to(device)

    wavlm_cfg = wavlm_large_config()
    if quick:
        wavlm_cfg.update(encoder_layers=1, encoder_ffn_embed_dim=1024)  # the Large width, one layer (CI)
    s3fd_hw = (90, 160) if quick else (360, 640)
    seconds = 0.5 if quick else 2.0
    frames = int(seconds * 50)
    return [
        ("Wav2Lip", lambda: ready(Wav2Lip(), channels_last=True),
         lambda b: (rand(b, 1, 80, 16, scale=8, offset=-4), rand(b, 6, 96, 96)),
         lambda m, x: m(*x), [1] if quick else [1, 8, 32, 128, 256], "frame"),
        ("S3FD", lambda: ready(S3FD(), channels_last=True),
         lambda b: (rand(b, 3, *s3fd_hw, scale=255, offset=-120),),
         lambda m, x: m(*x), [1] if quick else [1, 4, 16], f"{s3fd_hw[1]}x{s3fd_hw[0]} frame"),
        ("WavLM-Large" + (" (1 layer, quick)" if quick else ""), lambda: ready(meta(WavLM, wavlm_cfg)),
         lambda b: (rand(b, int(seconds * 16000), scale=0.2, offset=-0.1),),
         lambda m, x: m.extract_features(*x), [1] if quick else [1, 4, 8], f"{seconds:g} s of speech"),
        ("SynthesizerTrn (FreeVC)", lambda: ready(SynthesizerTrn(freevc_config("freevc"))),
         lambda b: (rand(b, 1024, frames, scale=2, offset=-1),
                    torch.nn.functional.normalize(rand(b, 256, offset=-0.5), dim=1)),
         lambda m, x: m.infer(x[0], g=x[1], noise_scale=0.0), [1] if quick else [1, 4, 8],
         f"{seconds:g} s of speech"),
    ]


def networks(s: Section, args, device: torch.device, built: dict) -> None:
    precisions = ["fp32", "bf16"] if args.quick else list(PRECISIONS)
    if device.type == "cpu" and not args.quick:
        precisions = ["fp32", "bf16"]  # CPU autocast fp16 is slow emulation; not what a CPU stage runs
    reps, warmup = (1, 0) if args.quick else (5, 1)  # quick: the peak-memory call is the warm-up
    rows, per_item_memory = [], {}
    s.note(SYNTHETIC)
    for index, (name, build, make_inputs, forward, batches, unit) in enumerate(_networks(args.quick, device)):
        if args.quick and index > 0:
            precisions = ["fp32"]  # CI keeps the code alive: one network through the reduced precisions is enough
        if s.remaining() < 20:
            s.note(f"{name}: skipped, out of time")
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        weights_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        t = time.perf_counter()
        model = build()
        load_s = time.perf_counter() - t
        weights = (torch.cuda.memory_allocated(device) - weights_before) if device.type == "cuda" else None
        for batch in batches:
            if s.remaining() < 15:
                s.note(f"{name} batch {batch}: skipped, out of time")
                break
            x = make_inputs(batch)
            reference = None
            for precision in precisions:
                dtype = PRECISIONS[precision]

                def call():
                    with torch.inference_mode(), autocast(device, dtype):
                        return forward(model, x)
                try:
                    peak, out = peak_bytes(call, device)
                    seconds, out = timed(call, device, reps=reps, warmup=warmup)
                except torch.OutOfMemoryError as exc:
                    rows.append([name, batch, precision, None, None, None, None, None, f"OOM: {str(exc)[:80]}"])
                    torch.cuda.empty_cache()
                    continue
                if precision == "fp32":
                    reference = out
                    d_max = d_mean = 0.0
                    bad = diff(out, out)[2]
                else:
                    d_max, d_mean, bad = diff(out, reference) if reference is not None else (None, None, 0)
                rows.append([name, batch, precision, 1000 * seconds / batch, mib(peak),
                             mib(peak / batch) if peak is not None else None, d_max, d_mean,
                             f"{bad} non-finite" if bad else ""])
                if peak is not None:
                    per_item_memory[f"{name} {precision} batch {batch}"] = peak / batch
            del x, reference
        s.note(f"{name}: built with synthetic weights in {load_s:.1f} s; weights on the device "
               f"{mib(weights) or 0:.0f} MiB; one item = {unit}")
        if name.split(" ")[0] in ("WavLM-Large", "SynthesizerTrn"):
            built["wavlm" if name.startswith("WavLM") else "synthesizer"] = model  # the pipeline's voice stage reuses them
        del model
    s.table("networks (ms per item, peak = activation memory above the weights)",
            ["network", "batch", "precision", "ms/item", "peak MiB", "MiB/item", "max |d| vs fp32",
             "mean |d| vs fp32", "notes"], rows)
    s["rows"] = rows
    s["activation_bytes_per_item"] = per_item_memory
    from lipserve.lipsync.syncer import CUDA_BYTES_PER_ITEM

    s.note(f"the lip-sync stage plans {CUDA_BYTES_PER_ITEM / MIB:.0f} MiB per Wav2Lip item (CUDA_BYTES_PER_ITEM) "
           "when it sizes batches from its memory cap; compare with the MiB/item column")


# ============================================================================ the in-process pipeline

class CarriedSpeech:
    """The TTS stage replaced by wavs made on the build machine (TTS is not a GPU stage)."""

    def __init__(self, wavs: dict[str, tuple[np.ndarray, int]]):
        self.wavs = wavs

    def languages(self) -> dict[str, list[str]]:
        return {"carried": ["en"]}

    def synthesize(self, text: str, language: str, engine: str, seed: int | None = None):
        from lipserve.tts.base import SpeechResult

        audio, rate = self.wavs[text]
        return SpeechResult(audio=audio, sample_rate=rate, engine="carried-wav", voice=text, language="en",
                            cached=False)

    def describe(self) -> dict:
        return {"engine": "carried-wav"}


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    import scipy.io.wavfile

    rate, data = scipy.io.wavfile.read(path)
    audio = data.astype(np.float32) / (32768.0 if data.dtype == np.int16 else 1.0)
    return (audio.mean(axis=1) if audio.ndim == 2 else audio), int(rate)


def variant(video: bytes, tag: str) -> bytes:
    """The same frames and sound in new bytes (a new content hash): a video the caches have not seen."""
    import io

    import av

    src = av.open(io.BytesIO(video))
    buffer = io.BytesIO()
    dst = av.open(buffer, mode="w", format="mp4")
    dst.metadata["comment"] = f"lipserve device check {tag}"
    mapping = {stream.index: dst.add_stream_from_template(stream) for stream in src.streams
               if stream.type in ("video", "audio")}
    for packet in src.demux():
        if packet.dts is None or packet.stream.index not in mapping:
            continue
        packet.stream = mapping[packet.stream.index]
        dst.mux(packet)
    dst.close()
    src.close()
    return buffer.getvalue()


class KnownBoxDetector:
    """Stand-in face detector for a box whose OpenCV ships no Haar cascade (opencv-python 5): the
    test clip's known face box at t = 0 (testmedia), scaled to the frames it is given."""

    name = "known-box"

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        from devtools import testmedia
        from make_inputs import CLIP_SIZE

        height, width = frames.shape[1:3]
        x1, y1, x2, y2 = testmedia.face_box_at(0.0, CLIP_SIZE)
        sx, sy = width / CLIP_SIZE[0], height / CLIP_SIZE[1]
        return [np.array([x1 * sx, y1 * sy, x2 * sx, y2 * sy]) for _ in frames]


class Bench:
    """One Pipeline (stages loaded once) and a local storage root with the inputs in it."""

    def __init__(self, args, device: torch.device, inputs: Path, built: dict | None = None):
        from lipserve.lipsync import LipSyncer
        from lipserve.pipeline import Pipeline
        from lipserve.settings import Settings
        from lipserve.voice import VoiceConverter

        self.root = Path(tempfile.mkdtemp(prefix="lipserve-check-"))
        (self.root / "in").mkdir()
        self.clip = (inputs / "clip.mp4").read_bytes()
        (self.root / "in" / "clip.mp4").write_bytes(self.clip)
        self.videos = 0
        self.texts = {}
        wavs = {}
        for seconds in (2, 10):
            path = inputs / f"speech_{seconds}s.wav"
            if path.is_file():
                text = f"carried speech {seconds} s"
                audio, rate = read_wav(path)
                # quick (CI): one second of it keeps every code path at a quarter of the work
                wavs[text] = (audio[:rate], rate) if args.quick else (audio, rate)
                self.texts[seconds] = text
        # quick (CI): eager networks, not the CPU fast graphs (converting them at load costs tens of seconds);
        # on a GPU the backends' `auto` is eager anyway
        eager = {f"{n}_backend": "eager" for n in ("wavlm", "synthesizer", "wav2lip", "s3fd")} if args.quick else {}
        self.settings = Settings(storage_root=self.root, weights_dir=self.root / "no-weights", device=device.type,
                                 allow_synthetic_weights=True, request_timeout_s=1800, max_speech_seconds=60,
                                 face_mode="static", **eager)
        t = time.perf_counter()
        # the WavLM (one layer in quick) and SynthesizerTrn the networks section built: the same synthetic
        # rule the stage would apply, without filling 1.2 GB of WavLM weights twice
        built = built or {}
        wavlm, synthesizer = built.get("wavlm"), built.get("synthesizer")
        if args.quick and wavlm is None:
            from lipserve.models.wavlm import WavLM
            from lipserve.voice.loaders import wavlm_large_config
            from lipserve.weights.synthetic import fill_synthetic

            cfg = wavlm_large_config()
            cfg.update(encoder_layers=1, encoder_ffn_embed_dim=1024)
            wavlm = fill_synthetic(WavLM(cfg)).eval().requires_grad_(False)
        self.voice = VoiceConverter(self.settings, wavlm=wavlm, synthesizer=synthesizer,
                                    given_models_synthetic=wavlm is not None or synthesizer is not None)
        self.voice_load_s = time.perf_counter() - t
        t = time.perf_counter()
        self.detector_note = ""
        try:
            self.lipsync = LipSyncer(self.settings)
        except RuntimeError as exc:
            if "Haar cascade" not in str(exc):
                raise
            # an OpenCV without the cascade files (opencv 5): faces from the clip's known position instead
            self.detector_note = f"Haar unavailable here ({exc}); faces from the clip's known box, detection not timed"
            self.lipsync = LipSyncer(self.settings, detector=KnownBoxDetector())
        self.lipsync_load_s = time.perf_counter() - t
        self.pipeline = Pipeline(self.settings, tts=CarriedSpeech(wavs), voice=self.voice, lipsync=self.lipsync)
        self.outputs = 0
        self.lock = threading.Lock()

    def forget_speakers(self) -> None:
        from lipserve.cache import LRUCache

        self.voice.speaker_cache = LRUCache(self.settings.voice.speaker_cache_size)

    def new_video(self) -> str:
        with self.lock:
            self.videos += 1
            name = f"in/clip_{self.videos}.mp4"
        (self.root / name).write_bytes(variant(self.clip, str(self.videos)))
        return name

    def request(self, seconds: int, video: str = "in/clip.mp4"):
        from lipserve.contract import LipVideoRequest, RequestOptions

        with self.lock:
            self.outputs += 1
            out = f"out/{self.outputs}.mp4"
        request = LipVideoRequest(word=self.texts[seconds], user_video_gs=video, output_video_gs=out, tts_lang="en",
                                  options=RequestOptions(overwrite=True))
        t = time.perf_counter()
        response = self.pipeline.run(request)
        wall = time.perf_counter() - t
        (self.root / out).unlink(missing_ok=True)
        return response, wall


STEP_KEYS = ("download", "probe", "tts", "faces", "voice", "lipsync", "upload", "first_frame", "total")


def pipeline_section(s: Section, args, device: torch.device, bench_box: dict) -> None:
    t = time.perf_counter()
    bench = Bench(args, device, args.inputs, bench_box.pop("built", None))
    bench_box["bench"] = bench
    if bench.detector_note:
        s.note(bench.detector_note)
    s.note(f"stages loaded in {time.perf_counter() - t:.1f} s (voice {bench.voice_load_s:.1f} s, lip sync "
           f"{bench.lipsync_load_s:.1f} s), synthetic weights; faces by {bench.lipsync.detector.name} "
           "(s3fd.pth absent: synthetic S3FD weights are never served)")
    s.note(f"voice {bench.voice.describe().get('precision')}, lip sync {bench.lipsync.describe().get('precision')}, "
           f"Wav2Lip batch {bench.lipsync.batch_size()}, cross-request batching "
           f"{'on' if bench.lipsync.wav2lip.merge else 'off'}")
    inputs_json = args.inputs / "inputs.json"
    if inputs_json.is_file():
        s.note("inputs: " + "; ".join(f"{k}: {v}" for k, v in json.loads(inputs_json.read_text()).items()))
    plan = [("cold (first request)", 2, "in/clip.mp4"), ("warm, new video", 2, None), ("warm, same video", 2, "in/clip.mp4")]
    if 10 in bench.texts and not args.quick:
        plan += [("warm, new video", 10, None), ("warm, same video", 10, None)]
    rows, last_new = [], None
    for label, seconds, video in plan:
        if seconds not in bench.texts:
            s.note(f"{label} {seconds} s: no speech_{seconds}s.wav in {args.inputs}")
            continue
        if s.remaining() < 20:
            s.note(f"{label} {seconds} s: skipped, out of time")
            continue
        if "new" in label:
            # new bytes (face cache miss) and a forgotten speaker embedding (the variant's voice track is the same)
            video = last_new = bench.new_video()
            bench.forget_speakers()
        elif video is None:
            video = last_new
        response, wall = bench.request(seconds, video)
        st = response.step_times
        lip = bench.lipsync
        frames = round(response.duration_s * 25)
        rows.append([label, round(response.duration_s, 2), *[st.get(k) for k in STEP_KEYS], frames, frames / st["total"],
                     frames / max(1e-9, st["lipsync"]), response.cache.get("face_boxes")])
        if label.startswith("cold"):
            s["cold_lipsync_describe"] = lip.describe()
    s.table("one request, in process (seconds)", ["request", "speech s", *STEP_KEYS, "frames", "fps (total)",
                                                  "fps (lip sync)", "face cache hit"], rows)
    s["rows"] = rows


# ============================================================================ memory per stage

def memory_section(s: Section, args, device: torch.device, bench_box: dict) -> None:
    bench = bench_box.get("bench")
    if bench is None:
        raise RuntimeError("the pipeline section did not build the stages")
    shares = serve_shares()
    seconds = 10 if (10 in bench.texts and not args.quick) else 2
    speech, rate = bench.pipeline.stages.tts.wavs[bench.texts[seconds]]
    reference = bench.voice.reference_from_video(bench.clip)
    from lipserve.lipsync import LipSyncOptions

    options = LipSyncOptions(face_mode="static")
    stages = {
        "VoiceConverter": lambda: bench.voice.convert(speech, rate, reference),
        "LipSyncer": lambda: bench.lipsync.sync(bench.clip, speech, rate, options),
    }
    if device.type != "cuda":
        import resource

        s.note("no CUDA device, nothing to measure: the peak resident memory of this whole process is "
               f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        s["shares"] = shares
        return
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    context = (total - free) - torch.cuda.memory_reserved()
    weights = {"VoiceConverter": sum(p.numel() * p.element_size() for m in (bench.voice.wavlm, bench.voice.synthesizer,
                                                                           bench.voice.speaker_encoder) if m is not None
                                     for p in m.parameters()),
               "LipSyncer": sum(p.numel() * p.element_size() for p in bench.lipsync.model.parameters())}
    rows = []
    for name, fn in stages.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak_alloc = torch.cuda.max_memory_allocated() - base + weights[name]
        peak_reserved = torch.cuda.max_memory_reserved()
        need = peak_alloc + max(0, context)
        share = shares.get(name, 0.0)
        fits = [("yes" if need <= share * gb * 1e9 else "NO") + f" ({share * gb:.0f} GB)" for gb in CARDS_GB.values()]
        rows.append([name, share, weights[name] / MIB, peak_alloc / MIB, peak_reserved / MIB, need / MIB, *fits])
    s.table(f"peak GPU memory per stage alone ({seconds} s of speech; 'needs' = weights + activations + the CUDA "
            "context of the process)", ["stage", "GPU share", "weights MiB", "peak allocated MiB",
                                        "peak reserved (all stages) MiB", "needs MiB",
                                        *[f"fits {k}?" for k in CARDS_GB]], rows)
    s.note(f"CUDA context and libraries outside torch's allocator: {context / MIB:.0f} MiB (each replica process "
           "pays it; lipserve.gpu reserves 640 MiB of its cap for it)")
    s["rows"] = rows
    s["cuda_context_bytes"] = context


# ============================================================================ throughput

def throughput_section(s: Section, args, device: torch.device, bench_box: dict) -> None:
    bench = bench_box.get("bench")
    if bench is None:
        raise RuntimeError("the pipeline section did not build the stages")
    levels = [2] if args.quick else [1, 4, 16]
    merges = (True,) if args.quick else (False, True)
    seconds = 2
    shared = bench.lipsync.wav2lip
    default_merge = shared.merge
    rows = []
    try:
        for concurrency in levels:
            for merge in merges:
                if s.remaining() < 25:
                    s.note(f"{concurrency} concurrent, batching {merge}: skipped, out of time")
                    continue
                shared.merge = merge
                before = dict(shared.stats.as_dict())
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    results = list(pool.map(lambda _: bench.request(seconds), range(concurrency)))
                wall = time.perf_counter() - t
                after = shared.stats.as_dict()
                latencies = sorted(r.step_times["total"] for r, _ in results)
                first = [r.step_times.get("first_frame", float("nan")) for r, _ in results]
                frames = sum(round(r.duration_s * 25) for r, _ in results)
                forwards = after["forwards"] - before["forwards"]
                rows.append([concurrency, "on" if merge else "off", wall, concurrency / wall, frames / wall,
                             statistics.mean(latencies), latencies[len(latencies) // 2], latencies[-1],
                             statistics.mean(first), forwards, (after["items"] - before["items"]) / max(1, forwards),
                             after["merged_forwards"] - before["merged_forwards"], after["oom_splits"] - before["oom_splits"],
                             mib(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None])
    finally:
        shared.merge = default_merge
    audio, rate = bench.pipeline.stages.tts.wavs[bench.texts[seconds]]
    speech_s = len(audio) / rate
    s.table(f"concurrent requests in one process ({speech_s:g} s of speech each, same video, warm)",
            ["requests", "batching", "wall s", "requests/s", "output frames/s", "mean latency s", "p50 s", "max s",
             "mean first frame s", "Wav2Lip forwards", "frames/forward", "merged forwards", "OOM splits",
             "peak GPU MiB (both stages)"], rows)
    s["rows"] = rows


# ============================================================================ the memory cap and OOM

def oom_section(s: Section, args, device: torch.device, bench_box: dict) -> None:
    """lipserve.gpu on a real card: cap this process's memory low, push a Wav2Lip batch far over
    it through SharedForward, and see it split and succeed instead of failing."""
    if device.type != "cuda":
        s.note("CUDA only (on a CPU the out-of-memory splitting is covered by tests/test_batching.py, which "
               "raises torch's out-of-memory type on purpose)")
        return
    from lipserve.batching import SharedForward
    from lipserve.gpu import CUDA_CONTEXT_RESERVE_BYTES, BatchBudget, cap_memory
    from lipserve.lipsync.syncer import CUDA_BYTES_PER_ITEM

    bench = bench_box.get("bench")
    if bench is None:
        raise RuntimeError("the pipeline section did not build the stages")
    items = 1024
    gen = torch.Generator().manual_seed(1)
    windows = (torch.rand(items, 1, 80, 16, generator=gen) * 8 - 4).to(device)
    faces = torch.rand(items, 6, 96, 96, generator=gen).to(device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    room = 2 * GIB
    fraction = min(1.0, (torch.cuda.memory_allocated(device) + room + CUDA_CONTEXT_RESERVE_BYTES) / total)
    try:
        cap = cap_memory(device, fraction)
        budget = BatchBudget(device, bytes_per_item=CUDA_BYTES_PER_ITEM, max_items=4096, cpu_items=16, cap_bytes=cap)
        shared = SharedForward(bench.lipsync._forward, merge=True, max_items=4096, wait_s=0.0, device=device,
                               name="wav2lip (capped)")
        t = time.perf_counter()
        out = shared(windows, faces)
        seconds = time.perf_counter() - t
        stats = shared.stats.as_dict()
        s.table("one Wav2Lip call far over a low memory cap", ["items asked", "cap GiB", "budget's batch",
                                                                "OOM splits", "forwards", "ceiling after",
                                                                "seconds", "output"],
                [[items, cap / GIB, budget.items(), stats["oom_splits"], stats["forwards"], shared.max_items(),
                  seconds, str(tuple(out.shape))]])
        s["stats"] = stats
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device.index or 0)
        torch.cuda.empty_cache()


# ============================================================================ encode

def encode_section(s: Section, args, device: torch.device) -> None:
    import io

    import av

    from lipserve import media

    clip = (args.inputs / "clip.mp4").read_bytes()
    t = time.perf_counter()
    frames = media.decode_frames(clip, count=50 if args.quick else 250)
    decode_s = time.perf_counter() - t
    s.note(f"decode (PyAV, CPU): {len(frames)} frames of {frames.shape[2]}x{frames.shape[1]} in {decode_s:.2f} s "
           f"({1000 * decode_s / len(frames):.1f} ms/frame)")
    rows = []
    for codec, options in (("libx264", {"preset": "veryfast", "crf": "23"}), ("h264_nvenc", {"preset": "p4", "cq": "23"})):
        try:
            buffer = io.BytesIO()
            t = time.perf_counter()
            with av.open(buffer, mode="w", format="mp4") as container:
                stream = container.add_stream(codec, rate=25)
                stream.height, stream.width = frames.shape[1:3]
                stream.pix_fmt = "yuv420p"
                stream.options = options
                for image in frames:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode(None):
                    container.mux(packet)
            seconds = time.perf_counter() - t
            rows.append([codec, str(options), len(frames), 1000 * seconds / len(frames), len(frames) / seconds,
                         len(buffer.getvalue()) / 1024, "ok"])
        except Exception as exc:  # noqa: BLE001 - a missing encoder or driver is a finding, not the end
            rows.append([codec, str(options), len(frames), None, None, None, f"{type(exc).__name__}: {exc}"[:160]])
    s.table("H.264 encode of the output frames", ["encoder", "options", "frames", "ms/frame", "frames/s", "KiB",
                                                  "status"], rows)
    s["rows"] = rows


# ============================================================================ main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lipserve one-shot device check")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI on a CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--inputs", type=Path, default=ROOT / ".whl" / "inputs",
                        help="clip.mp4 and speech_*.wav (benchmarks/gpu/make_inputs.py); made here if absent")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget (default 420, quick 240)")
    parser.add_argument("--sections", default="environment,inputs,networks,pipeline,memory,throughput,oom,encode")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out DIR is needed when $OUT is not set")
    if args.device == "auto":
        args.device = "cuda" if _cuda() else "cpu"
    if args.device == "cuda" and not _cuda():
        print("--device cuda but torch sees no CUDA device; the report says so", file=sys.stderr)
    device = torch.device(args.device if (args.device == "cpu" or _cuda()) else "cpu")
    # quick runs in CI to keep the code paths alive, on shared CPUs: a generous budget, since a section
    # skipped for time would fail that test
    budget = args.budget_s or (900.0 if args.quick else 420.0)
    report = Report(args.out, budget, args)
    os.environ.setdefault("LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS", "1")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    def inputs(s: Section) -> None:
        if (args.inputs / "clip.mp4").is_file():
            s.note(f"carried inputs in {args.inputs}")
            return
        made = Path(tempfile.mkdtemp(prefix="lipserve-check-inputs-"))
        s.note(f"no inputs in {args.inputs}: made them in {made} (speech-like noise in quick mode)")
        from make_inputs import make

        make(made, synthetic_speech=args.quick)
        args.inputs = made

    wanted = set(args.sections.split(","))
    bench_box: dict = {}
    steps = [
        ("environment", lambda s: environment(s, args), 1),
        ("inputs", inputs, 1),
        ("networks", lambda s: networks(s, args, device, bench_box.setdefault("built", {})), 30),
        ("pipeline", lambda s: pipeline_section(s, args, device, bench_box), 40),
        ("memory", lambda s: memory_section(s, args, device, bench_box), 20),
        ("throughput", lambda s: throughput_section(s, args, device, bench_box), 30),
        ("oom", lambda s: oom_section(s, args, device, bench_box), 15),
        ("encode", lambda s: encode_section(s, args, device), 10),
    ]
    for name, fn, needs in steps:
        if name in wanted:
            report.run(name, fn, needs_s=needs)
    report.write()
    failed = [s["name"] for s in report.sections if s["status"] == "failed"]
    print(f"report: {args.out / 'report.md'} ({len(report.sections)} sections, failed: {failed or 'none'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
