"""Streamed answers: the fragmented-MP4 writer, and the one-process pipeline's stream."""
from __future__ import annotations

import numpy as np
import pytest

from devtools import testmedia
from lipserve import media
from lipserve.contract import LipVideoRequest, RequestOptions
from lipserve.media.fragments import FIRST_FRAGMENT_FRAMES, FRAGMENT_FRAMES, mp4_boxes, stream_mp4
from lipserve.pipeline import Pipeline
from lipserve.settings import Settings

FPS = 25


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / mse) if mse > 0 else float("inf")


@pytest.fixture(scope="module")
def moving_frames() -> np.ndarray:
    clip = testmedia.astronaut_clip(seconds=2.0, fps=FPS, size=(320, 240), audio=None, motion="pan")
    return media.decode_frames(clip)


def test_a_stream_is_a_moov_then_fragments_handed_out_while_frames_still_come(moving_frames):
    speech = testmedia.speechlike(2.0, sample_rate=16000)
    consumed = []

    def frames():
        for i, frame in enumerate(moving_frames):
            consumed.append(i)
            yield frame

    pieces, consumed_at_piece = [], []
    for piece in stream_mp4(frames(), FPS, speech, 16000):
        assert piece, "no empty pieces"
        pieces.append(piece)
        consumed_at_piece.append(len(consumed))
    data = b"".join(pieces)
    boxes = mp4_boxes(data)
    assert boxes[:3] == ["ftyp", "moov", "moof"]
    assert boxes.count("moof") == boxes.count("mdat") >= len(moving_frames) // FRAGMENT_FRAMES
    # each fragment leaves as soon as the first frame of the next is in: the first after
    # FIRST_FRAGMENT_FRAMES frames, then one every FRAGMENT_FRAMES (the last one at the end)
    left_at = [consumed_at_piece[i] for i, p in enumerate(pieces) if b"moof" in p]
    expected = list(range(FIRST_FRAGMENT_FRAMES + 1, len(moving_frames), FRAGMENT_FRAMES))
    assert left_at[:-1] == expected and left_at[-1] == len(moving_frames)

    whole = media.encode_mp4(moving_frames, FPS, speech, 16000)
    streamed, plain = media.decode_frames(data), media.decode_frames(whole)
    assert streamed.shape == plain.shape == moving_frames.shape
    # both are the same frames through the codec: codec noise apart (measured ~40 dB each)
    assert psnr(streamed, moving_frames) > 33 and psnr(plain, moving_frames) > 33
    info = media.probe(data)
    assert info.has_audio and abs(media.read_audio(data, 16000).size / 16000 - 2.0) < 0.1
    assert abs(info.fps - FPS) < 0.01 and info.n_frames == len(moving_frames)  # one frame per 1/fps from 0


def test_a_failure_mid_stream_ends_it_without_its_last_fragment(moving_frames):
    def failing():
        for i, frame in enumerate(moving_frames):
            if i == 30:
                raise RuntimeError("the renderer failed")
            yield frame

    pieces = []
    with pytest.raises(RuntimeError, match="renderer failed"):
        for piece in stream_mp4(failing(), FPS, None, 16000):
            pieces.append(piece)
    assert pieces and b"moof" in b"".join(pieces)
    assert "mfra" not in mp4_boxes(b"".join(pieces))  # the index a finished file ends with is missing


# ---------------------------------------------------------------- the one-process pipeline

@pytest.fixture(scope="module")
def streaming_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-root")
    (root / "src.mp4").write_bytes(testmedia.astronaut_clip(seconds=3.0, fps=FPS, size=(320, 240),
                                                            audio="speechlike", motion="pan"))
    settings = Settings(storage_root=root, weights_dir=tmp_path_factory.mktemp("no-weights"),
                        allow_synthetic_weights=True, tts_order=["piper"], device="cpu", torch_threads=1,
                        warmup=False)
    return Pipeline(settings), root


@pytest.mark.slow
def test_the_pipeline_streams_the_answer_and_writes_the_same_file_once_at_the_end(streaming_pipeline):
    pipeline, root = streaming_pipeline
    pieces, seen_output = [], []

    def on_piece(piece: bytes) -> None:
        pieces.append(piece)
        seen_output.append((root / "out" / "s.mp4").exists())

    request = LipVideoRequest(word="Streaming is here now.", user_video_gs="src.mp4", output_video_gs="out/s.mp4",
                              options=RequestOptions(face_mode="track"))
    response = pipeline.run(request, on_piece=on_piece)
    data = b"".join(pieces)
    assert (root / "out" / "s.mp4").read_bytes() == data  # the stored answer is what was streamed
    assert not any(seen_output)  # written once, after the last piece
    assert mp4_boxes(data)[:3] == ["ftyp", "moov", "moof"]
    st = response.step_times
    assert st["tts"] + st["voice"] < st["first_fragment"] < st["total"]
    frames = media.decode_frames(data)
    assert len(frames) == round(response.duration_s * FPS) and response.frames_passed_through == 0

    # the same request answered whole: the same frames within codec noise
    whole = pipeline.run(request.model_copy(update={"output_video_gs": "out/w.mp4"}))
    plain = media.decode_frames((root / "out" / "w.mp4").read_bytes())
    assert "first_fragment" not in whole.step_times and plain.shape == frames.shape
    assert psnr(frames, plain) > 25  # synthetic weights paint noisy mouths, which cost the codec most


@pytest.mark.slow
def test_a_streams_first_fragment_leaves_before_the_rest_of_the_source_is_decoded(streaming_pipeline, monkeypatch):
    """The answer uses fewer frames than the clip has: its source frames are decoded as the frame
    loop takes them, so when the first fragment is handed out only about its frames are decoded."""
    pipeline, root = streaming_pipeline
    made = []

    class Recorded(media.FramesOnDemand):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(media, "FramesOnDemand", Recorded)
    decoded_at_first_fragment = []

    def on_piece(piece: bytes) -> None:
        if b"moof" in piece and not decoded_at_first_fragment:
            decoded_at_first_fragment.append(made[-1].counters["decoded"])

    request = LipVideoRequest(word="Decode as you go.", user_video_gs="src.mp4", output_video_gs="out/lazy.mp4")
    response = pipeline.run(request, on_piece=on_piece)
    n_out = round(response.duration_s * FPS)
    assert len(made) == 1 and len(made[0]) == n_out < 3.0 * FPS  # the answer is shorter than the clip
    assert decoded_at_first_fragment[0] <= FIRST_FRAGMENT_FRAMES + 1 + 8 < n_out  # + the decoder's read-ahead
    assert made[0].counters["decoded"] >= n_out


@pytest.mark.slow
def test_a_stream_that_fails_after_its_first_piece_raises_and_writes_nothing(streaming_pipeline, monkeypatch):
    pipeline, root = streaming_pipeline
    syncer = pipeline.stages.lipsync
    real = syncer.sync_stream

    def breaks_after_two_pieces(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise RuntimeError("lost the GPU mid-answer")
            yield item

    monkeypatch.setattr(syncer, "sync_stream", breaks_after_two_pieces)
    pieces = []
    with pytest.raises(RuntimeError, match="mid-answer"):
        pipeline.run(LipVideoRequest(word="This one breaks.", user_video_gs="src.mp4", output_video_gs="out/x.mp4"),
                     on_piece=pieces.append)
    assert len(pieces) == 2
    assert not (root / "out" / "x.mp4").exists() and not list(root.glob("out/.*"))


def test_a_streams_first_wav2lip_batch_is_its_first_fragment_and_the_frame_that_closes_it():
    """first_batch caps only the first batch; every output frame is the same as without it."""
    import torch

    from lipserve.lipsync.frame_loop import synced_frames

    rng = np.random.default_rng(3)
    n = 40
    frames = rng.integers(0, 255, (n, 120, 160, 3), dtype=np.uint8)
    boxes = np.tile(np.array([20, 10, 120, 110]), (n, 1))
    present = np.ones(n, dtype=bool)
    present[[7, 8]] = False  # frames without a face are not in any batch
    mel = rng.standard_normal((80, 200)).astype(np.float32)
    starts = np.arange(n) * 4

    def run(first_batch):
        sizes = []

        def forward(windows, faces):
            sizes.append(windows.shape[0])
            return faces[:, :3] * 0.5 + windows.mean() * 0  # a deterministic stand-in for Wav2Lip

        out = list(synced_frames(frames, boxes, boxes, present, np.arange(n), mel, starts, {}, forward=forward,
                                 batch_size=lambda: 16, device=torch.device("cpu"), tensor_ops=False,
                                 first_batch=first_batch))
        return sizes, out

    streamed_sizes, streamed = run(FIRST_FRAGMENT_FRAMES + 1)
    whole_sizes, whole = run(None)
    assert streamed_sizes == [FIRST_FRAGMENT_FRAMES + 1, 16, 16, 38 - 16 - 16 - FIRST_FRAGMENT_FRAMES - 1]
    assert whole_sizes == [16, 16, 6]
    assert len(streamed) == len(whole) == n and all(np.array_equal(a, b) for a, b in zip(streamed, whole))
    assert np.array_equal(streamed[7], frames[7])  # passed through untouched
