"""Settings, one small section per component, from env vars (`LIPSERVE_*`) and an optional YAML file.

Each section is read once from its own keys: explicit arguments > environment > the YAML file
named by `LIPSERVE_CONFIG` (flat, the same key names) > defaults. The component that uses a
section is its only reader, so a deployment's `user_config.settings` may only set the keys of
the sections that deployment owns (`deployments` says which); any other key is refused.

Defaults are safe: local storage confined to `./data`, no GCS bucket allowed until listed
(`allowed_buckets: ["*"]` opens all), modest input limits, synthetic weights off.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict


def read_config_file() -> dict[str, Any]:
    """The mapping in the file named by LIPSERVE_CONFIG ({} when unset)."""
    path = os.environ.get("LIPSERVE_CONFIG")
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LIPSERVE_CONFIG points to {p}, which does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of setting names to values")
    unknown = sorted(set(data) - set(SECTION_OF))
    if unknown:
        raise ValueError(f"{p}: unknown settings {unknown}; the known ones are listed in README.md")
    return data


class _FileSource(PydanticBaseSettingsSource):
    """This section's keys from the LIPSERVE_CONFIG file; lowest priority above defaults."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by pydantic here
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        own = self.settings_cls.model_fields
        return {k: v for k, v in read_config_file().items() if k in own}


def split_list(v):
    """Env vars give "a,b" (or JSON); YAML gives a list."""
    if isinstance(v, str):
        v = v.strip()
        if v.startswith("["):
            return json.loads(v)
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


class Section(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIPSERVE_", extra="forbid", frozen=True)
    name: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _FileSource(settings_cls))


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


class StorageSettings(Section):
    """lipserve.storage.Storage: where inputs and outputs may live."""
    name: ClassVar[str] = "storage"
    storage_root: Path = Field(Path("data"), description="Local paths in requests resolve under this folder and cannot leave it.")
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list, description="GCS buckets requests may read/write; empty = none, ['*'] = any.")
    gcs_project: str | None = Field(None, description="GCP project for the storage client (None: from the environment).")
    storage_timeout_s: float = Field(60.0, description="Per-call timeout for GCS operations.")

    _split = field_validator("allowed_buckets", mode="before")(split_list)

    def bucket_allowed(self, bucket: str) -> bool:
        return "*" in self.allowed_buckets or bucket in self.allowed_buckets


class LimitsSettings(Section):
    """The input limits, checked once at admission (lipserve.pipeline's checks)."""
    name: ClassVar[str] = "limits"
    max_input_bytes: int = Field(100 * 1024 * 1024, description="Largest source video (or reference audio) accepted, in bytes.")
    max_video_seconds: float = Field(60.0, description="Longest source video accepted.")
    max_resolution: int = Field(1920 * 1080, description="Largest source frame, in pixels (width x height).")
    max_text_chars: int = Field(500, description="Longest `word` accepted, in characters.")
    max_speech_seconds: float = Field(30.0, description="Longest synthesized speech accepted.")


class RuntimeSettings(Section):
    """How a model stage loads and runs (lipserve.runtime.ModelRuntime): device, precision, weights, warm-up."""
    name: ClassVar[str] = "runtime"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto = fp16 autocast on CUDA, fp32 on CPU.")
    torch_threads: int = Field(0, description="torch CPU threads; 0 = torch's default.")
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1, description="Cap on this process's CUDA memory as a share of the card; None = the replica's Ray GPU share (no cap in one process).")
    fast_cache_dir: Path | None = Field(Path("~/.cache/lipserve/openvino"), description="Where converted OpenVINO graphs are kept between starts (keyed by a hash of the weights); empty = convert at every start.")
    weights_dir: Path = Field(default_factory=default_weights_dir, description="Where checkpoint files are looked up (see weights/manifest.toml); default: the checkout's weights/, else ~/.local/share/lipserve/weights.")
    allow_synthetic_weights: bool = Field(False, description="Run the real networks on deterministic synthetic weights when checkpoints are missing (output NOT meaningful; flagged in every response).")
    warmup: bool = Field(True, description="Before a stage takes requests, run every request path once on small synthetic inputs (TTS, reference voice, WavLM, synthesis, faces, Wav2Lip at its batch sizes, encode), so the first request is as fast as later ones.")
    warmup_seconds: float = Field(0.6, ge=0.5, le=30.0, description="Length of the synthetic speech and video the warm-up runs through the stages, at least 0.5 (lip sync always covers one full Wav2Lip batch plus a partial one).")

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


class SpeechSettings(Section):
    """lipserve.tts.SpeechSynthesizer."""
    name: ClassVar[str] = "speech"
    tts_order: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["piper", "espeak", "gtts"], description="Engines tried by `auto`, in order (a server with internet may put gtts first).")
    tts_timeout_s: float = Field(10.0, description="Per-call timeout for online TTS.")
    tts_cache_size: int = Field(512, description="Synthesized utterances remembered.")

    _split = field_validator("tts_order", mode="before")(split_list)


class VoiceSettings(Section):
    """lipserve.voice.VoiceConverter."""
    name: ClassVar[str] = "voice"
    freevc_variant: Literal["freevc", "freevc-s", "freevc-24"] = Field("freevc", description="Which FreeVC checkpoint the voice stage uses.")
    wavlm_backend: Literal["auto", "eager", "openvino"] = Field("auto", description="WavLM execution: auto = the OpenVINO fp32 graph on CPU when installed and within its bound, else eager.")
    synthesizer_backend: Literal["auto", "eager", "openvino"] = Field("auto", description="FreeVC SynthesizerTrn execution (as wavlm_backend).")
    speaker_cache_size: int = Field(1024, description="Speaker embeddings remembered.")


class LipSyncSettings(Section):
    """lipserve.lipsync.LipSyncer; face_mode, pads and resize_factor are the defaults of a request's options."""
    name: ClassVar[str] = "lipsync"
    wav2lip_checkpoint: Literal["wav2lip", "wav2lip_gan"] = Field("wav2lip_gan", description="Which Wav2Lip checkpoint the lip-sync stage uses.")
    wav2lip_backend: Literal["auto", "eager", "openvino"] = Field("auto", description="Wav2Lip execution (as wavlm_backend).")
    s3fd_backend: Literal["auto", "eager", "openvino"] = Field("auto", description="S3FD execution (as wavlm_backend).")
    face_mode: Literal["auto", "static", "track", "box"] = Field("auto", description="Default face finding mode.")
    pads: tuple[int, int, int, int] = Field((0, 20, 0, 0), description="Face crop padding: top, bottom, left, right (px).")
    resize_factor: int = Field(1, description="Downscale the source by this factor before lip sync.")
    face_cache_size: int = Field(256, description="Videos whose probe and face boxes are remembered.")
    cross_request_batching: Literal["auto", "on", "off"] = Field("auto", description="Merge the Wav2Lip frame batches of requests in flight on one replica into one forward; auto = on for CUDA, off on CPU (measured slower there).")
    batching_wait_ms: float = Field(5.0, ge=0, description="Longest a merged forward waits for requests in flight that have no frames queued yet.")


class ServingSettings(Section):
    """The HTTP edge and jobs (deployments/)."""
    name: ClassVar[str] = "serving"
    auth_token: str | None = Field(None, description="When set, every route but /health and the static pages (/, /docs, /redoc, /openapi.json) needs `Authorization: Bearer <token>`.")
    max_body_bytes: int = Field(64 * 1024, description="Largest HTTP request body accepted, in bytes; a larger one is refused (413) before it is read.")
    request_timeout_s: float = Field(120.0, description="Whole-request timeout at the ingress (a job's work too).")
    replacement_wait_s: float = Field(60.0, ge=0, description="How long a request waits for a stage's replacement replica that is starting on a node that can host it (a drained node's stage) before it is refused with 503 `stage_unavailable`; 0 refuses at once. A stage no live node can host is refused at once.")
    job_retention_s: float = Field(3600.0, description="How long a finished job's result (or error) stays readable at GET /api/v1/jobs/{id}.")
    job_lost_after_s: float = Field(30.0, description="A queued or running job whose ingress replica has not reported for this long is failed with `job_interrupted`.")


SECTIONS: dict[str, type[Section]] = {s.name: s for s in (StorageSettings, LimitsSettings, RuntimeSettings,
                                                           SpeechSettings, VoiceSettings, LipSyncSettings,
                                                           ServingSettings)}
SECTION_OF: dict[str, str] = {field: name for name, cls in SECTIONS.items() for field in cls.model_fields}


def split_by_section(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{setting: value} -> {section: {setting: value}}; an unknown setting is an error."""
    unknown = sorted(set(flat) - set(SECTION_OF))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; the known ones are listed in README.md")
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        out.setdefault(SECTION_OF[key], {})[key] = value
    return out


class Settings(BaseModel):
    """All sections, for what assembles the stages (`lipserve run`, a test, a deployment's build).

    `Settings(face_mode="track", max_text_chars=100)` routes each flat key to its section; the
    rest of each section comes from the environment and the config file. A component reads only
    its own section: `settings.lipsync.face_mode`, `settings.limits.max_text_chars`."""

    model_config = ConfigDict(frozen=True)

    storage: StorageSettings
    limits: LimitsSettings
    runtime: RuntimeSettings
    speech: SpeechSettings
    voice: VoiceSettings
    lipsync: LipSyncSettings
    serving: ServingSettings

    def __init__(self, **values: Any):
        sections = {k: values.pop(k) for k in list(values) if k in SECTIONS}
        for name, own in split_by_section(values).items():
            if name in sections:
                raise ValueError(f"both the section {name!r} and its setting(s) {sorted(own)} were given")
            sections[name] = SECTIONS[name](**own)
        for name, cls in SECTIONS.items():
            section = sections.get(name)
            if section is None:
                sections[name] = cls()
            elif isinstance(section, dict):
                sections[name] = cls(**section)
        super().__init__(**sections)

    def replace(self, **flat: Any) -> "Settings":
        """A copy with these flat settings changed (each in its section, validated again)."""
        updated = {name: getattr(self, name) for name in SECTIONS}
        for name, own in split_by_section(flat).items():
            updated[name] = SECTIONS[name](**{**getattr(self, name).model_dump(), **own})
        return Settings(**updated)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
