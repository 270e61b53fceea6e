"""Memory each GPU stage needs, measured on CPU: parameter bytes and peak activation bytes.

The basis for the single-GPU profile (serve_config.single-gpu.yaml: VoiceConverter and LipSyncer
on one GPU at 0.5 each). Weights are the networks' own initialisation (memory does not depend on
the values). Activations are measured in fp32 under inference_mode by tracking every tensor the
forward pass allocates until it is freed (peak of the live total; inputs and weights excluded).

These are ESTIMATES of GPU use until a GPU run measures torch.cuda.max_memory_allocated: on CUDA,
fp16 autocast stores most activations in half the bytes but keeps fp32 weights (plus a cached
fp16 copy of each weight while autocast runs), cuDNN picks kernels with their own workspaces,
and each process holds a CUDA context on top. None of that is measured here.

Run: `python benchmarks/bench_stage_memory.py [--wav2lip-batch 32] [--speech-seconds 30]`.
"""
from __future__ import annotations

import argparse
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lipserve.lipsync.syncer import CUDA_BYTES_PER_ITEM, CUDA_MAX_BATCH
from lipserve.models.freevc import SynthesizerTrn
from lipserve.models.freevc_configs import freevc_config
from lipserve.models.s3fd import S3FD
from lipserve.models.speaker_encoder import SpeakerEncoder
from lipserve.models.wav2lip import Wav2Lip
from lipserve.models.wavlm import WavLM
from lipserve.voice.loaders import wavlm_large_config

MIB = 1024 * 1024


class PeakLiveBytes(TorchDispatchMode):
    """Peak of the bytes held by tensors that ops create while the mode is active.

    Tensors are grouped by storage (views share one); a storage counts from the op that made it
    until the last tensor on it is garbage-collected.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [size, 1]
                self.current += size
            weakref.finalize(tensor, self._release, key)
        self.peak = max(self.peak, self.current)
        return out


def param_bytes(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers()))


def peak_activation(fn) -> tuple[int, float]:
    """(peak live activation bytes, seconds) of one call of fn under inference_mode."""
    tracker = PeakLiveBytes()
    start = time.perf_counter()
    with torch.inference_mode(), tracker:
        fn()
    return tracker.peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wav2lip-batch", type=int, default=32, help="Wav2Lip batch measured (scaled to the CUDA maximum)")
    parser.add_argument("--speech-seconds", type=float, default=30.0, help="speech length for WavLM and the synthesizer")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []  # (stage, what, MiB)

    # ---- LipSyncer: Wav2Lip + S3FD
    wav2lip, s3fd = Wav2Lip().eval(), S3FD().eval()
    lipsync_weights = param_bytes(wav2lip, s3fd)
    rows.append(("LipSyncer", "weights fp32: Wav2Lip + S3FD", lipsync_weights / MIB))
    batch = args.wav2lip_batch
    mel, faces = torch.randn(batch, 1, 80, 16), torch.rand(batch, 6, 96, 96)
    w2l_peak, w2l_s = peak_activation(lambda: wav2lip(mel, faces))
    per_item = w2l_peak / batch
    rows.append(("LipSyncer", f"Wav2Lip activations, batch {batch} ({w2l_s:.1f} s)", w2l_peak / MIB))
    rows.append(("LipSyncer", f"  per sample: {per_item / MIB:.1f} MiB; budget in syncer.py "
                 f"{CUDA_BYTES_PER_ITEM / MIB:.0f} MiB", per_item / MIB))
    rows.append(("LipSyncer", f"Wav2Lip activations scaled to the CUDA maximum batch {CUDA_MAX_BATCH}",
                 per_item * CUDA_MAX_BATCH / MIB))
    frame = torch.rand(1, 3, 720, 1280) * 255 - 117
    s3fd_peak, s3fd_s = peak_activation(lambda: s3fd(frame))
    rows.append(("LipSyncer", f"S3FD activations, one 1280x720 frame ({s3fd_s:.1f} s)", s3fd_peak / MIB))
    rows.append(("LipSyncer", "S3FD activations x8 (the CUDA detection batch)", 8 * s3fd_peak / MIB))
    del wav2lip, s3fd

    # ---- VoiceConverter: WavLM-Large + SynthesizerTrn + speaker encoder
    wavlm = WavLM(wavlm_large_config()).eval()
    synth = SynthesizerTrn(freevc_config("freevc")).eval()
    speaker = SpeakerEncoder().eval()
    rows.append(("VoiceConverter", "weights fp32: WavLM-Large + SynthesizerTrn + speaker encoder",
                 param_bytes(wavlm, synth, speaker) / MIB))
    rows.append(("VoiceConverter", "  of which WavLM-Large", param_bytes(wavlm) / MIB))
    samples = int(args.speech_seconds * 16000)
    wav = torch.randn(1, samples) * 0.1
    content = {}

    def run_wavlm():
        content["c"] = wavlm.extract_features_chunked(wav, chunk_frames=1000, context_frames=250).transpose(1, 2)

    wavlm_peak, wavlm_s = peak_activation(run_wavlm)
    rows.append(("VoiceConverter", f"WavLM activations, {args.speech_seconds:g} s speech ({wavlm_s:.1f} s)",
                 wavlm_peak / MIB))
    g = torch.randn(1, 256)
    synth_peak, synth_s = peak_activation(lambda: synth.infer(content["c"].float(), g=g, noise_scale=0.0))
    rows.append(("VoiceConverter", f"SynthesizerTrn activations, {args.speech_seconds:g} s ({synth_s:.1f} s)",
                 synth_peak / MIB))

    width = max(len(r[1]) for r in rows)
    print(f"{'stage':<15} {'what':<{width}}  MiB")
    for stage, what, mib in rows:
        print(f"{stage:<15} {what:<{width}}  {mib:8.1f}")
    print("fp32 on CPU; estimates for the GPU until measured there (see the module docstring).")


if __name__ == "__main__":
    main()
