"""The weights manifest (weights/manifest.toml): which checkpoint files exist, where to get them,
what they must look like, and which stage uses each.

The architectures' expected key sets ship with the package (lipserve/weights/keysets/*.json,
{key: shape} in state_dict order, taken from the official modules), so `verify` can check a file
without building the networks.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .formats import FORMATS

STAGES = ("lipsync", "face", "voice")
MANIFEST_ENV = "LIPSERVE_WEIGHTS_MANIFEST"


class ManifestError(ValueError):
    """The manifest file is malformed (an operator's file, so a plain ValueError with the reason)."""


@dataclass(frozen=True)
class WeightEntry:
    file: str
    stage: str
    variants: tuple[str, ...]
    kind: str  # a formats.FORMATS key
    keyset: str  # lipserve/weights/keysets/<keyset>.json
    size: int | None  # None = not published
    sha256: str  # "" = not published
    sha256_prefix: str
    urls: tuple[str, ...]
    license: str
    note: str = ""
    approx_size: str = ""
    hash_source: str = ""  # where sha256/size were read, or that they were recorded on first fetch

    @property
    def name(self) -> str:
        """The file name without its extension (`wav2lip_gan`, `WavLM-Large`, ...)."""
        return Path(self.file).stem

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return load_keyset(self.keyset)

    def used_by(self, variant: str) -> bool:
        return "*" in self.variants or variant in self.variants


@dataclass
class Manifest:
    path: Path
    entries: list[WeightEntry] = field(default_factory=list)

    def get(self, name: str) -> WeightEntry:
        """An entry by file name (`wav2lip_gan.pth`) or stem (`wav2lip_gan`), case-insensitive."""
        wanted = name.strip().lower()
        for entry in self.entries:
            if wanted in (entry.file.lower(), entry.name.lower()):
                return entry
        known = ", ".join(e.file for e in self.entries)
        raise KeyError(f"{name!r} is not in {self.path} (known: {known})")

    def files(self) -> list[str]:
        return [e.file for e in self.entries]

    def record(self, file: str, *, sha256: str, size: int, source: str = "") -> None:
        """Write a fetched file's sha256 (and size, where it was unknown) into the manifest file,
        with a hash_source line saying it was recorded on first fetch (from `source`).

        Edits only those lines of the file's table, so comments and layout survive.
        """
        entry = self.get(file)
        recorded = "recorded on first fetch (trust on first use)" + (f" from {source}" if source else "")
        lines = self.path.read_text().splitlines(keepends=True)
        header = f'[files."{entry.file}"]'
        try:
            start = next(i for i, line in enumerate(lines) if line.strip() == header)
        except StopIteration:
            raise ManifestError(f"{self.path}: no table {header}") from None
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        replaced = set()
        for i in range(start + 1, end):
            if re.match(r"\s*sha256\s*=", lines[i]):
                lines[i] = f'sha256 = "{sha256}"\n'
                replaced.add("sha256")
            elif re.match(r"\s*size\s*=", lines[i]) and not entry.size:
                lines[i] = f"size = {int(size)}\n"
                replaced.add("size")
            elif re.match(r"\s*hash_source\s*=", lines[i]):
                lines[i] = f"hash_source = {json.dumps(recorded)}\n"
                replaced.add("hash_source")
        if "sha256" not in replaced:
            lines.insert(start + 1, f'sha256 = "{sha256}"\n')
        if "hash_source" not in replaced:
            lines.insert(start + 1, f"hash_source = {json.dumps(recorded)}\n")
        _atomic_write_text(self.path, "".join(lines))
        # keep this object in step with the file
        index = self.entries.index(entry)
        self.entries[index] = WeightEntry(**{**entry.__dict__, "sha256": sha256, "size": entry.size or int(size),
                                             "hash_source": recorded})


def default_manifest_path() -> Path:
    """$LIPSERVE_WEIGHTS_MANIFEST, else weights/manifest.toml of this checkout."""
    env = os.environ.get(MANIFEST_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "weights" / "manifest.toml"


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    path = Path(path) if path is not None else default_manifest_path()
    if not path.is_file():
        raise ManifestError(f"weights manifest {path} not found (set {MANIFEST_ENV} to its location)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML ({exc})") from exc
    tables = data.get("files")
    if not isinstance(tables, dict) or not tables:
        raise ManifestError(f"{path}: expected [files.\"<name>\"] tables")
    entries = [_entry(path, file, table) for file, table in tables.items()]
    return Manifest(path, entries)


def _entry(path: Path, file: str, t: dict) -> WeightEntry:
    def need(key, kind):
        if key not in t or not isinstance(t[key], kind):
            raise ManifestError(f"{path}: files.{file!r} needs {key!r} ({kind.__name__})")
        return t[key]

    stage, kind, keyset = need("stage", str), need("kind", str), need("keyset", str)
    if stage not in STAGES:
        raise ManifestError(f"{path}: files.{file!r}: stage {stage!r} is not one of {STAGES}")
    if kind not in FORMATS:
        raise ManifestError(f"{path}: files.{file!r}: kind {kind!r} is not one of {sorted(FORMATS)}")
    sha = need("sha256", str).lower()
    if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ManifestError(f"{path}: files.{file!r}: sha256 must be 64 hex digits or empty")
    size = int(need("size", int))
    return WeightEntry(
        file=file, stage=stage, variants=tuple(need("variants", list)), kind=kind, keyset=keyset,
        size=size or None, sha256=sha, sha256_prefix=str(t.get("sha256_prefix", "")).lower(),
        urls=tuple(need("urls", list)), license=need("license", str), note=str(t.get("note", "")),
        approx_size=str(t.get("approx_size", "")), hash_source=str(t.get("hash_source", "")),
    )


@lru_cache(maxsize=None)
def load_keyset(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an official architecture, from the package's keysets/<name>.json."""
    try:
        text = resources.files("lipserve.weights").joinpath("keysets").joinpath(f"{name}.json").read_text()
    except FileNotFoundError:
        raise ManifestError(f"no key set named {name!r} in lipserve/weights/keysets/") from None
    return {k: tuple(int(d) for d in v) for k, v in json.loads(text).items()}


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
