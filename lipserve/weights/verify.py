"""Check the checkpoint files that are present, and say what each stage will load.

A file passes when it reads in its official layout (formats.read_checkpoint: top-level keys,
`module.` prefix, ...) and its state_dict has exactly the architecture's keys and shapes
(formats.check_keys against the shipped key set) -- the same checks the stage loaders make in
resolve.load_weights, without building the networks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..settings import Settings
from .fetch import sha256_of
from .formats import FORMATS, CheckpointFormatError, check_keys, read_checkpoint
from .manifest import Manifest, WeightEntry


@dataclass
class FileCheck:
    file: str
    path: Path
    status: str  # ok | missing | invalid
    message: str = ""
    warnings: list[str] = field(default_factory=list)  # e.g. not the published size/hash

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def verify_file(entry: WeightEntry, weights_dir: str | Path, *, hash_check: bool = False) -> FileCheck:
    path = Path(weights_dir) / entry.file
    if not path.is_file():
        return FileCheck(entry.file, path, "missing", f"{path} is not there")
    check = FileCheck(entry.file, path, "ok")
    size = path.stat().st_size
    if entry.size and size != entry.size:
        check.warnings.append(f"size {size} differs from the published {entry.size}: not the official file")
    if hash_check:
        digest = sha256_of(path)
        if entry.sha256 and digest != entry.sha256:
            check.warnings.append(f"sha256 {digest} differs from the manifest's {entry.sha256}")
        elif not entry.sha256 and entry.sha256_prefix and not digest.startswith(entry.sha256_prefix):
            check.warnings.append(f"sha256 {digest} does not start with the published {entry.sha256_prefix}")
    try:
        ckpt = read_checkpoint(path, entry.kind)
        strict = FORMATS[entry.kind].strict  # the speaker encoder's official loader is non-strict
        check_keys(ckpt.state_dict, entry.expected_shapes(), where=str(path), strict=strict)
        if entry.kind == "wavlm" and not isinstance(ckpt.extra.get("cfg"), dict):
            raise CheckpointFormatError(f"{path}: 'cfg' is not a dict of WavLM settings")
    except CheckpointFormatError as exc:
        check.status, check.message = "invalid", exc.message
        return check
    check.message = f"{entry.kind} layout, {len(ckpt.state_dict)} tensors match the {entry.keyset} key set"
    return check


def verify_all(manifest: Manifest, weights_dir: str | Path, names: list[str] | None = None,
               *, hash_check: bool = False) -> list[FileCheck]:
    entries = [manifest.get(n) for n in names] if names else manifest.entries
    return [verify_file(e, weights_dir, hash_check=hash_check) for e in entries]


@dataclass
class StagePlan:
    stage: str
    needs: list[str]  # files
    loads: str  # what the stage will run on, in words
    ready: bool  # False: the stage will refuse to start (WeightsMissing / invalid file)


def needed_files(settings: Settings, manifest: Manifest) -> dict[str, list[WeightEntry]]:
    """The manifest entries each stage uses under these settings."""
    variant_of = {"lipsync": settings.lipsync.wav2lip_checkpoint, "face": "s3fd", "voice": settings.voice.freevc_variant}
    return {stage: [e for e in manifest.entries if e.stage == stage and e.used_by(variant_of[stage])]
            for stage in ("lipsync", "face", "voice")}


def stage_plans(settings: Settings, manifest: Manifest, checks: list[FileCheck]) -> list[StagePlan]:
    """What each stage will load, given the files present (checks) and settings.runtime.allow_synthetic_weights."""
    by_file = {c.file: c for c in checks}
    plans = []
    for stage, entries in needed_files(settings, manifest).items():
        states = {e.file: by_file.get(e.file) for e in entries}
        invalid = [f for f, c in states.items() if c is not None and c.status == "invalid"]
        missing = [f for f, c in states.items() if c is None or c.status == "missing"]
        files = [e.file for e in entries]
        if invalid:
            plans.append(StagePlan(stage, files, f"WILL FAIL: invalid {', '.join(invalid)}", False))
        elif not missing:
            plans.append(StagePlan(stage, files, f"official weights: {', '.join(files)}", True))
        elif stage == "face":
            # never synthetic S3FD: boxes must stay real, so the face stage has a real fallback
            plans.append(StagePlan(stage, files, "OpenCV Haar cascade fallback (s3fd.pth missing)", True))
        elif settings.runtime.allow_synthetic_weights:
            plans.append(StagePlan(stage, files, f"SYNTHETIC weights (missing {', '.join(missing)}): output not meaningful", True))
        else:
            plans.append(StagePlan(stage, files, f"WILL FAIL: missing {', '.join(missing)} "
                                                 "(fetch them, or allow synthetic weights)", False))
    return plans
