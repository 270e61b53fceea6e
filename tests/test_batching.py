"""Cross-request batching (lipserve.batching) and GPU memory discipline (lipserve.gpu), on the CPU:
merged forwards give each caller its own result, out-of-memory shrinks a batch instead of failing
(driven by raising torch's out-of-memory type), and two concurrent lip-sync requests on one
LipSyncer give the videos two sequential ones give while their frames share forwards."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from devtools import testmedia
from lipserve import media
from lipserve.batching import SharedForward, merge_enabled
from lipserve.errors import GPUOutOfMemory
from lipserve.gpu import OOM_ERRORS, BatchBudget, cap_memory, first_that_fits, forward_in_halves, memory_fraction
from lipserve.lipsync import LipSyncer, LipSyncOptions
from lipserve.settings import Settings

CPU = torch.device("cpu")
OOM = OOM_ERRORS[0]


def _run_threads(targets):
    errors, threads = [], []
    for target in targets:
        def guarded(target=target):
            try:
                target()
            except Exception as exc:  # collected and re-raised in the test thread
                errors.append(exc)
        threads.append(threading.Thread(target=guarded))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]


def _affine(x: torch.Tensor, y: torch.Tensor):
    time.sleep(0.01)
    return x * 2 + y


# ----------------------------------------------------------------------------- SharedForward

@pytest.mark.parametrize("merge", [True, False])
def test_concurrent_requests_share_forwards_and_get_their_own_rows(merge):
    shared = SharedForward(_affine, merge=merge, max_items=64, wait_s=5.0, device=CPU)
    both_in = threading.Barrier(2)
    results = {}

    def request(name: str, offset: float):
        with shared.request():
            both_in.wait()  # both in flight before the first batch: every forward can merge
            results[name] = [shared(torch.full((3, 2), offset + i), torch.ones(3, 2)) for i in range(4)]

    _run_threads([lambda: request("a", 0.0), lambda: request("b", 100.0)])
    for name, offset in (("a", 0.0), ("b", 100.0)):
        for i, out in enumerate(results[name]):
            assert torch.equal(out, torch.full((3, 2), (offset + i) * 2 + 1))
    stats = shared.stats
    assert stats.items == 24
    if merge:
        assert stats.forwards == 4 and stats.merged_forwards == 4 and stats.max_requests_per_forward == 2
    else:
        assert stats.forwards == 8 and stats.merged_forwards == 0


def test_a_lone_request_never_waits_and_merges_respect_max_items():
    shared = SharedForward(_affine, merge=True, max_items=4, wait_s=5.0, device=CPU)
    with shared.request():
        t = time.perf_counter()
        shared(torch.zeros(3, 1), torch.zeros(3, 1))
        assert time.perf_counter() - t < 2.0  # nobody else in flight: no 5 s wait
    both_in = threading.Barrier(2)

    def request():
        with shared.request():
            both_in.wait()
            shared(torch.zeros(3, 1), torch.zeros(3, 1))

    _run_threads([request, request])
    assert shared.stats.merged_forwards == 0  # 3 + 3 > 4: never in one forward
    assert shared.stats.forwards == 3


def test_a_failing_batch_fails_only_its_own_request():
    def picky(x):
        if (x < 0).any():
            raise ValueError("negative input")
        return x + 1

    shared = SharedForward(picky, merge=True, max_items=64, wait_s=5.0, device=CPU)
    both_in = threading.Barrier(2)
    outcome = {}

    def request(name, value):
        with shared.request():
            both_in.wait()
            try:
                outcome[name] = shared(torch.full((2,), value))
            except ValueError as exc:
                outcome[name] = exc

    _run_threads([lambda: request("good", 1.0), lambda: request("bad", -1.0)])
    assert torch.equal(outcome["good"], torch.full((2,), 2.0))
    assert isinstance(outcome["bad"], ValueError)


# ----------------------------------------------------------------------------- out of memory

def _fits_up_to(limit: int, calls: list):
    def forward(x):
        calls.append(len(x))
        if len(x) > limit:
            raise OOM(f"CUDA out of memory (injected: {len(x)} > {limit})")
        return x * 3
    return forward


def test_out_of_memory_halves_the_batch_and_retries():
    calls = []
    seen = []
    out = forward_in_halves(_fits_up_to(3, calls), [torch.arange(10.0)], CPU, on_oom=seen.append)
    assert torch.equal(out, torch.arange(10.0) * 3)
    assert calls[0] == 10 and seen[:2] == [10, 5] and max(calls[len(seen):]) <= 3


def test_out_of_memory_at_one_item_is_a_503_not_a_500():
    with pytest.raises(GPUOutOfMemory) as info:
        forward_in_halves(_fits_up_to(0, []), [torch.arange(4.0)], CPU)
    assert info.value.status == 503 and info.value.retry_after and isinstance(info.value.__cause__, OOM)


def test_shared_forward_remembers_a_lower_ceiling_after_out_of_memory():
    calls = []
    shared = SharedForward(_fits_up_to(4, calls), merge=True, max_items=64, wait_s=0.0, device=CPU)
    assert torch.equal(shared(torch.arange(16.0)), torch.arange(16.0) * 3)
    assert shared.stats.oom_splits >= 1 and shared.max_items() <= 4
    calls.clear()
    shared(torch.arange(8.0))
    assert calls == [4, 4]  # the next forward starts below the ceiling: no failed attempt


def test_first_that_fits_steps_down_and_ends_in_a_503():
    attempts = []

    def attempt(size):
        def run():
            attempts.append(size)
            if size > 100:
                raise OOM("injected")
            return size
        return run

    assert first_that_fits([attempt(400), attempt(200), attempt(100)], CPU) == 100
    assert attempts == [400, 200, 100]
    with pytest.raises(GPUOutOfMemory):
        first_that_fits([attempt(400), attempt(300)], CPU)


def test_voice_content_retries_wavlm_in_shorter_windows(monkeypatch):
    from lipserve.voice.converter import VoiceConverter

    tried = []

    class FakeWavLM:
        def extract_features(self, wav):
            return torch.zeros(1, wav.shape[-1] // 320, 4)

        def extract_features_chunked(self, wav, *, chunk_frames, context_frames, extract=None):
            tried.append((chunk_frames, context_frames))
            if chunk_frames >= 500:
                raise OOM("injected")
            # must really take the windowed path: window + context on both sides shorter than the input
            assert chunk_frames + 2 * context_frames < wav.shape[-1] // 320
            return torch.zeros(1, wav.shape[-1] // 320, 4)

    wavlm = FakeWavLM()
    fake = SimpleNamespace(wavlm=wavlm, device=CPU, wavlm_chunk_frames=1000, wavlm_context_frames=250,
                           runtime=SimpleNamespace(autocast_context=lambda: torch.autocast("cpu", enabled=False)),
                           _content_runner=lambda: wavlm)
    features = VoiceConverter.content(fake, np.zeros(16000 * 20, dtype=np.float32))  # 20 s: 1000 frames
    assert features.shape == (1, 4, 1000)
    assert tried[0] == (1000, 250) and tried[-1][0] < 500


# ----------------------------------------------------------------------------- memory budget

def test_memory_fraction_and_cap():
    assert memory_fraction(None, None) is None          # one process: no cap
    assert memory_fraction(None, 0.5) == 0.5            # the replica's Ray share
    assert memory_fraction(Settings(gpu_memory_fraction=0.3).runtime.gpu_memory_fraction, 0.5) == 0.3  # the setting wins
    assert cap_memory(CPU, 0.5) is None                       # nothing to cap on a CPU


def test_batch_budget_sizes_batches_from_the_cap():
    gib = 2**30
    state = {"free": 40 * gib, "reserved": 3 * gib, "allocated": 2 * gib}
    budget = BatchBudget(CPU, bytes_per_item=gib // 8, max_items=512, cpu_items=16, cap_bytes=10 * gib,
                         memory_info=lambda: (state["free"], state["reserved"], state["allocated"]))
    # the card has 41 GiB free for us, but the cap leaves 10 - 2 = 8 GiB; half of it planned: 32 items
    assert budget.items() == 32
    state["free"] = 1 * gib       # another process took the card: 1 + (3 - 2) GiB free, half planned
    assert budget.items() == 8
    state["free"], state["allocated"] = 0, 3 * gib
    assert budget.items() == 1    # never zero: the OOM retry decides
    assert BatchBudget(CPU, bytes_per_item=1, max_items=512, cpu_items=16).items() == 16


def test_merging_is_on_for_cuda_and_off_on_cpu_by_default():
    assert merge_enabled(Settings(), torch.device("cuda")) is True
    assert merge_enabled(Settings(), CPU) is False
    assert merge_enabled(Settings(cross_request_batching="on"), CPU) is True
    assert merge_enabled(Settings(cross_request_batching="off"), torch.device("cuda")) is False


# ----------------------------------------------------------------------------- the LipSyncer

@pytest.fixture(scope="module")
def merging_syncer(tmp_path_factory) -> LipSyncer:
    # eager Wav2Lip: the batcher is under test here, not the fast graph (lipserve.fast), which merges the same way
    settings = Settings(weights_dir=tmp_path_factory.mktemp("no_weights"), allow_synthetic_weights=True,
                        device="cpu", cross_request_batching="on", batching_wait_ms=3000, wav2lip_backend="eager")
    return LipSyncer(settings)


def _frames(mp4: bytes) -> np.ndarray:
    return media.decode_frames(mp4).astype(np.int16)


def test_two_concurrent_requests_give_the_sequential_videos_and_share_forwards(merging_syncer, monkeypatch):
    syncer = merging_syncer
    monkeypatch.setattr(syncer, "batch_size", lambda: 4)  # several batches per request in a short test
    video = testmedia.astronaut_clip(seconds=1.0, fps=25, size=(320, 240), audio=None)
    speech = {"a": testmedia.speechlike(0.64, 16000, seed=1), "b": testmedia.speechlike(0.52, 16000, seed=2)}
    options = LipSyncOptions(face_mode="static")
    syncer.plan_faces(video, options)  # faces cached: the two requests differ only in their speech

    # the frames each request hands to the encoder, keyed by its speech length
    handed: dict[int, list] = {}
    encode = media.encode_mp4

    def spy(frames, fps, audio, sample_rate, **kw):
        frames = [np.array(f) for f in frames]
        handed.setdefault(len(audio), []).append(np.stack(frames).astype(np.int16))
        return encode(frames, fps, audio, sample_rate, **kw)

    monkeypatch.setattr(media, "encode_mp4", spy)
    before = syncer.wav2lip.stats.merged_forwards
    sequential = {k: syncer.sync(video, s, 16000, options).mp4 for k, s in speech.items()}
    assert syncer.wav2lip.stats.merged_forwards == before  # one at a time: nothing to merge

    concurrent = {}
    _run_threads([lambda k=k, s=s: concurrent.__setitem__(k, syncer.sync(video, s, 16000, options).mp4)
                  for k, s in speech.items()])
    stats = syncer.wav2lip.stats
    assert stats.merged_forwards - before >= 1 and stats.max_requests_per_forward == 2, stats

    for k, s in speech.items():
        alone, together = handed[len(s)]
        # merged forwards may pick other float32 kernels (~1e-7 apart): at most one 8-bit level after rounding
        assert alone.shape == together.shape and np.abs(alone - together).max() <= 1
        a, b = _frames(sequential[k]), _frames(concurrent[k])
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.5  # and the same videos after H.264


def test_lipsync_survives_an_out_of_memory_with_the_same_video(merging_syncer, monkeypatch):
    syncer = merging_syncer
    video = testmedia.astronaut_clip(seconds=1.0, fps=25, size=(320, 240), audio=None)
    speech = testmedia.speechlike(0.4, 16000, seed=3)  # 10 frames: one batch of 10 > 5 fails, halves fit
    options = LipSyncOptions(face_mode="static")
    expected = _frames(syncer.sync(video, speech, 16000, options).mp4)

    monkeypatch.setattr(syncer.wav2lip, "_oom_ceiling", None)  # restored after: other tests see no ceiling
    real_model = syncer.lip_model  # what a CPU fp32 forward calls
    sizes = []

    def small_card(windows, faces):
        sizes.append(len(faces))
        if len(faces) > 6:
            raise OOM("CUDA out of memory (injected)")
        return real_model(windows, faces)

    monkeypatch.setattr(syncer, "lip_model", small_card)
    t = time.perf_counter()
    result = syncer.sync(video, speech, 16000, options)
    wall = time.perf_counter() - t
    assert sizes[0] == 10 and max(sizes[1:]) <= 6 and syncer.wav2lip.stats.oom_splits >= 1
    assert np.abs(_frames(result.mp4) - expected).max() <= 1
    assert 0 < result.timings["first_frame"] < wall


def test_s3fd_batches_split_on_out_of_memory_with_the_same_boxes(monkeypatch):
    from lipserve.lipsync.detectors import S3FDDetector
    from lipserve.models.s3fd import S3FD
    from lipserve.weights.synthetic import fill_synthetic

    detector = S3FDDetector(fill_synthetic(S3FD()).eval(), CPU, batch_size=3)
    frames = np.random.default_rng(0).integers(0, 255, (3, 64, 96, 3), dtype=np.uint8)
    expected = detector.detect(frames)
    real = detector.raw_outputs
    sizes = []

    def one_at_a_time(batch):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise OOM("CUDA out of memory (injected)")
        return real(batch)

    monkeypatch.setattr(detector, "raw_outputs", one_at_a_time)
    found = detector.detect(frames)
    assert sizes[:2] == [3, 2] and sizes[2:] == [1, 1, 1]
    assert len(found) == 3
    for a, b in zip(found, expected):
        assert (a is None and b is None) or np.allclose(a, b, atol=1e-3)
