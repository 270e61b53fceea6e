"""The HTTP contract as pydantic models (see DESIGN.md)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidField


class FaceBox(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x1: int
    y1: int
    x2: int
    y2: int


class RequestOptions(BaseModel):
    """Per-request knobs. Every field is optional; settings give the defaults."""

    model_config = ConfigDict(extra="forbid")
    face_mode: Literal["auto", "static", "track", "box"] | None = Field(
        None, description="auto (default): one box for a still head, tracking for a moving one; static; track; box")
    box: FaceBox | None = Field(None, description="Face box in source pixels, for face_mode='box'.")
    pads: tuple[int, int, int, int] | None = Field(None, description="top, bottom, left, right")
    resize_factor: int | None = Field(None, ge=1, le=8)
    overwrite: bool = False
    tts_engine: str = Field("auto", description="auto, piper, espeak or gtts")
    reference_audio: str | None = Field(None, description="gs:// or local path of a separate voice reference")
    audio: str | None = Field(None, description="gs:// or local path of the speech to say, instead of text-to-speech "
                                               "(any audio or video file; `word` may then be empty)")
    deterministic_voice: bool = Field(False, description="FreeVC prior noise off (not FreeVC's own sampling): identical audio for identical input")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Makes the random draws (piper's noise, FreeVC's prior) "
                             "reproducible: the same request and seed give the same video in any process")

    @field_validator("pads")
    @classmethod
    def _pads_non_negative(cls, v):
        if v is not None and any(p < 0 or p > 512 for p in v):
            raise ValueError("pads must each be within 0..512")
        return v


class LipVideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str = Field(..., description="What the person will say")
    user_video_gs: str = Field(..., min_length=1)
    output_video_gs: str = Field(..., min_length=1)
    tts_lang: str = Field("en", min_length=1, max_length=16)
    options: RequestOptions = Field(default_factory=RequestOptions)


class LipVideoResponse(BaseModel):
    request_id: str
    output_video_gs: str
    duration_s: float
    engines: dict[str, str] = Field(description="stage -> engine/checkpoint that ran")
    step_times: dict[str, float] = Field(description="seconds per stage, 'first_frame' (request start to the first lip-synced frame) and 'total'")
    synthetic_weights: bool = Field(description="True when any model ran on synthetic weights: output NOT meaningful")
    cache: dict[str, bool] = Field(default_factory=dict, description="which per-video work was reused (face_boxes, speaker_embedding)")
    warnings: list[str] = Field(default_factory=list)
    stage_spans: dict[str, list[float]] = Field(default_factory=dict, description="stage -> [start, end] unix seconds, measured where the stage ran")
    frames_passed_through: int = Field(0, description="output frames without a face, left exactly as in the source (no lip sync)")
    precision: dict[str, str] = Field(default_factory=dict, description="stage -> the precision its networks ran in: fp32, fp16 or bf16")
    voice_similarity: float | None = Field(None, description="cosine between the speaker embeddings of the voice reference and of the converted speech (speaker encoder of the voice stage); higher = closer to the user's voice")


def parse_request(payload: dict) -> LipVideoRequest:
    """Validate a request body; the error names the field and the rule that failed."""
    try:
        return LipVideoRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidField(f"{field}: {first['msg']}", field=field) from None
