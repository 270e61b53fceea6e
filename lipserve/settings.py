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


def default_weights_dir(package_dir: Path | None = None) -> Path:
    """Where checkpoints are looked for unless weights_dir is set: never relative to the current folder.

    The project's own weights/ when lipserve runs from its checkout (an editable install: the
    manifest sits there), else the user's data folder, $XDG_DATA_HOME/lipserve/weights
    (~/.local/share/lipserve/weights).
    """
    checkout = (package_dir or Path(__file__).resolve().parent).parent / "weights"
    if (checkout / "manifest.toml").is_file():
        return checkout
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "lipserve" / "weights"


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
    cross_request_batching: Literal["auto", "on", "off"] = Field("auto", description="Merge the Wav2Lip frame batches of requests in flight on one replica into one forward; auto = on for CUDA, off on CPU (measured slower there).")
    batching_wait_ms: float = Field(5.0, ge=0, description="Longest a merged forward waits for requests in flight that have no frames queued yet.")
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1, description="Cap on this process's CUDA memory as a share of the card; None = the replica's Ray GPU share (no cap in one process).")
    wavlm_backend: Literal["auto", "eager", "openvino"] = Field("auto", description="WavLM execution: auto = the OpenVINO fp32 graph on CPU when installed and within its bound, else eager.")
    synthesizer_backend: Literal["auto", "eager", "openvino"] = Field("auto", description="FreeVC SynthesizerTrn execution (as wavlm_backend).")
    wav2lip_backend: Literal["auto", "eager", "openvino"] = Field("auto", description="Wav2Lip execution (as wavlm_backend).")
    s3fd_backend: Literal["auto", "eager", "openvino"] = Field("auto", description="S3FD execution (as wavlm_backend).")
    fast_cache_dir: Path | None = Field(Path("~/.cache/lipserve/openvino"), description="Where converted OpenVINO graphs are kept between starts (keyed by a hash of the weights); empty = convert at every start.")

    # weights
    weights_dir: Path = Field(default_factory=default_weights_dir, description="Where checkpoint files are looked up (see weights/manifest.toml); default: the checkout's weights/, else ~/.local/share/lipserve/weights.")
    allow_synthetic_weights: bool = Field(False, description="Run the real networks on deterministic synthetic weights when checkpoints are missing (output NOT meaningful; flagged in every response).")
    freevc_variant: Literal["freevc", "freevc-s", "freevc-24"] = Field("freevc", description="Which FreeVC checkpoint the voice stage uses.")
    wav2lip_checkpoint: Literal["wav2lip", "wav2lip_gan"] = Field("wav2lip_gan", description="Which Wav2Lip checkpoint the lip-sync stage uses.")

    # speech
    tts_order: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["piper", "espeak", "gtts"], description="Engines tried by `auto`, in order (a server with internet may put gtts first).")
    tts_timeout_s: float = Field(10.0, description="Per-call timeout for online TTS.")

    # lip sync defaults (per-request options override)
    face_mode: Literal["auto", "static", "track", "box"] = Field("auto", description="Default face finding mode.")
    pads: tuple[int, int, int, int] = Field((0, 20, 0, 0), description="Face crop padding: top, bottom, left, right (px).")
    resize_factor: int = Field(1, description="Downscale the source by this factor before lip sync.")

    # caches (entries)
    face_cache_size: int = Field(256, description="Videos whose probe and face boxes are remembered.")
    speaker_cache_size: int = Field(1024, description="Speaker embeddings remembered.")
    tts_cache_size: int = Field(512, description="Synthesized utterances remembered.")

    # start-up
    warmup: bool = Field(True, description="Before a stage takes requests, run every request path once on small synthetic inputs (TTS, reference voice, WavLM, synthesis, faces, Wav2Lip at its batch sizes, encode), so the first request is as fast as later ones.")
    warmup_seconds: float = Field(0.6, ge=0.5, le=30.0, description="Length of the synthetic speech and video the warm-up runs through the stages, at least 0.5 (lip sync always covers one full Wav2Lip batch plus a partial one).")

    # serving
    auth_token: str | None = Field(None, description="When set, every route but /health and the static pages (/, /docs, /redoc, /openapi.json) needs `Authorization: Bearer <token>`.")
    max_body_bytes: int = Field(64 * 1024, description="Largest HTTP request body accepted, in bytes; a larger one is refused (413) before it is read.")
    request_timeout_s: float = Field(120.0, description="Whole-request timeout at the ingress (a job's work too).")
    job_retention_s: float = Field(3600.0, description="How long a finished job's result (or error) stays readable at GET /api/v1/jobs/{id}.")
    job_lost_after_s: float = Field(30.0, description="A queued or running job whose ingress replica has not reported for this long is failed with `job_interrupted`.")

    @field_validator("fast_cache_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    def cpu_threads(self) -> int:
        """Threads a stage's CPU kernels may use: torch_threads, or torch's default."""
        if self.torch_threads:
            return self.torch_threads
        import torch

        return torch.get_num_threads()

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
