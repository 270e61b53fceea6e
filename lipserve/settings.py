"""One settings object, from env vars (`LIPSERVE_*`) and an optional YAML file.

Precedence: explicit keyword arguments > environment > YAML file (`LIPSERVE_CONFIG`) > defaults.
Defaults are safe: local storage confined to `./data`, no GCS bucket allowed until listed
(`allowed_buckets: ["*"]` opens all), modest input limits, synthetic weights off.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from typing import Annotated


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the file named by LIPSERVE_CONFIG (if any); lowest priority above defaults."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by pydantic here
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("LIPSERVE_CONFIG")
        if not path:
            return {}
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"LIPSERVE_CONFIG points to {p}, which does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of setting names to values")
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIPSERVE_", extra="forbid")

    # storage
    storage_root: Path = Field(Path("data"), description="Local paths in requests resolve under this folder and cannot leave it.")
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list, description="GCS buckets requests may read/write; empty = none, ['*'] = any.")
    gcs_project: str | None = Field(None, description="GCP project for the storage client (None: from the environment).")
    storage_timeout_s: float = Field(60.0, description="Per-call timeout for GCS operations.")

    # limits
    max_input_bytes: int = Field(100 * 1024 * 1024, description="Largest source video (or reference audio) accepted, in bytes.")
    max_video_seconds: float = Field(60.0, description="Longest source video accepted.")
    max_resolution: int = Field(1920 * 1080, description="Largest source frame, in pixels (width x height).")
    max_text_chars: int = Field(500, description="Longest `word` accepted, in characters.")
    max_speech_seconds: float = Field(30.0, description="Longest synthesized speech accepted.")

    # compute
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto = fp16 autocast on CUDA, fp32 on CPU.")
    torch_threads: int = Field(0, description="torch CPU threads; 0 = torch's default.")

    # weights
    weights_dir: Path = Field(Path("weights"), description="Where checkpoint files are looked up (see weights/manifest.toml).")
    allow_synthetic_weights: bool = Field(False, description="Run the real networks on deterministic synthetic weights when checkpoints are missing (output NOT meaningful; flagged in every response).")
    freevc_variant: Literal["freevc", "freevc-s", "freevc-24"] = Field("freevc", description="Which FreeVC checkpoint the voice stage uses.")
    wav2lip_checkpoint: Literal["wav2lip", "wav2lip_gan"] = Field("wav2lip_gan", description="Which Wav2Lip checkpoint the lip-sync stage uses.")

    # speech
    tts_order: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["piper", "espeak", "gtts"], description="Engines tried by `auto`, in order (a server with internet may put gtts first).")
    tts_timeout_s: float = Field(10.0, description="Per-call timeout for online TTS.")

    # lip sync defaults (per-request options override)
    face_mode: Literal["static", "track", "box"] = Field("static", description="Default face finding mode.")
    pads: tuple[int, int, int, int] = Field((0, 20, 0, 0), description="Face crop padding: top, bottom, left, right (px).")
    resize_factor: int = Field(1, description="Downscale the source by this factor before lip sync.")

    # caches (entries)
    face_cache_size: int = Field(256, description="Videos whose probe and face boxes are remembered.")
    speaker_cache_size: int = Field(1024, description="Speaker embeddings remembered.")
    tts_cache_size: int = Field(512, description="Synthesized utterances remembered.")

    # serving
    auth_token: str | None = Field(None, description="When set, every route but /health needs `Authorization: Bearer <token>`.")
    max_body_bytes: int = Field(64 * 1024, description="Largest HTTP request body accepted, in bytes; a larger one is refused (413) before it is read.")
    request_timeout_s: float = Field(120.0, description="Whole-request timeout at the ingress.")

    @field_validator("allowed_buckets", "tts_order", mode="before")
    @classmethod
    def _split_csv(cls, v):
        # env vars give "a,b"; YAML gives a list
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _YamlSource(settings_cls))

    def bucket_allowed(self, bucket: str) -> bool:
        return "*" in self.allowed_buckets or bucket in self.allowed_buckets


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
