"""What a request's answer says: built once from what the stages produced (in process and under Serve)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .contract import LipVideoRequest, LipVideoResponse
from .timing import StageTimer

# step_times keys, in the order the request meets them (the table is printed in this order)
STAGES = ("download", "probe", "tts", "faces", "voice", "lipsync", "upload")

SYNTHETIC_WARNING = ("SYNTHETIC WEIGHTS: at least one model ran on deterministic synthetic weights "
                     "because its checkpoint is missing. The OUTPUT IS NOT MEANINGFUL. "
                     "Fetch the checkpoints with `lipserve weights fetch`.")


@dataclass
class Outcome:
    """What the stages produced for one request (input to build_response)."""

    speech: Any = None      # SpeechResult
    voice: Any = None       # VoiceResult
    plan: Any = None        # FacePlan
    sync: Any = None        # SyncResult
    engines: dict[str, str] = field(default_factory=dict)
    extra_warnings: list[str] = field(default_factory=list)
    first_frame: float | None = None  # seconds from the request's start to its first lip-synced frame
    first_fragment: float | None = None  # streamed: seconds from the request's start to its first MP4 fragment


def build_response(request: LipVideoRequest, request_id: str, timer: StageTimer, outcome: Outcome,
                   output_uri: str) -> LipVideoResponse:
    step_times = {k: round(timer.step_times[k], 4) for k in STAGES if k in timer.step_times}
    for step in ("first_frame", "first_fragment"):
        if getattr(outcome, step) is not None:
            step_times[step] = round(getattr(outcome, step), 4)
    step_times["total"] = round(timer.total(), 4)
    synthetic = bool(getattr(outcome.voice, "synthetic_weights", False) or getattr(outcome.sync, "synthetic_weights", False))
    warnings = (list(getattr(outcome.speech, "fallbacks", []) or []) + list(getattr(outcome.voice, "warnings", []) or [])
                + list(getattr(outcome.sync, "warnings", []) or [])
                + outcome.extra_warnings)
    if synthetic:
        warnings.insert(0, SYNTHETIC_WARNING)
    engines = dict(outcome.engines)
    if outcome.speech is not None:
        engines.setdefault("tts", f"{outcome.speech.engine}:{outcome.speech.voice}")
    if outcome.plan is not None:
        engines.setdefault("faces", outcome.plan.detector)
    cache = {
        "face_boxes": bool(getattr(outcome.plan, "cached", False)),
        "speaker_embedding": bool(getattr(outcome.voice, "speaker_cached", False)),
        "tts": bool(getattr(outcome.speech, "cached", False)),
    }
    precision = {stage: result.precision for stage, result in (("voice", outcome.voice), ("lipsync", outcome.sync))
                 if getattr(result, "precision", None)}
    return LipVideoResponse(
        request_id=request_id,
        output_video_gs=output_uri,
        duration_s=round(float(outcome.sync.duration_s), 4),
        engines=engines,
        step_times=step_times,
        synthetic_weights=synthetic,
        cache=cache,
        warnings=warnings,
        stage_spans={k: [round(a, 4), round(b, 4)] for k, (a, b) in timer.spans.items()},
        frames_passed_through=int(getattr(outcome.sync, "frames_passed_through", 0)),
        face_mode=getattr(outcome.sync, "face_mode", None) or None,
        precision=precision,
        voice_similarity=getattr(outcome.voice, "voice_similarity", None),
    )


def stage_engines(voice_desc: dict, lipsync_desc: dict) -> dict[str, str]:
    """'voice' and 'lipsync' engine names from the stages' describe() dicts."""
    def name(desc: dict, *keys: str, default: str) -> str:
        for k in keys:
            if desc.get(k):
                return str(desc[k])
        return default

    return {"voice": name(voice_desc, "engine", "variant", "checkpoint", default="freevc"),
            "lipsync": name(lipsync_desc, "engine", "checkpoint", default="wav2lip")}
