"""The official checkpoint file layouts: read them, write them (for tests), check key sets.

| kind            | top level                                               | state_dict at            |
| wav2lip         | state_dict, optimizer, global_step, global_epoch        | ['state_dict'], 'module.' prefix |
| s3fd            | the state_dict itself                                   | (root)                   |
| freevc          | model, iteration, optimizer, learning_rate              | ['model']                |
| wavlm           | cfg, model                                              | ['model'] (+ cfg dict)   |
| speaker_encoder | step, model_state, optimizer_state                      | ['model_state'], extra keys ignored |
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointFormatError  # noqa: F401 - defined with every other error; raised here


@dataclass(frozen=True)
class CheckpointFormat:
    kind: str
    required_top: tuple[str, ...]  # keys the official loader reads
    state_key: str | None  # where the state_dict lives (None = root)
    prefix: str = ""  # DataParallel 'module.' prefix on every key
    strict: bool = True  # official loader's strictness
    ignored_extra: tuple[str, ...] = ()  # keys the official non-strict loader drops


FORMATS: dict[str, CheckpointFormat] = {
    "wav2lip": CheckpointFormat("wav2lip", ("state_dict",), "state_dict", prefix="module."),
    "s3fd": CheckpointFormat("s3fd", (), None),
    "freevc": CheckpointFormat("freevc", ("model", "iteration", "learning_rate"), "model"),
    "wavlm": CheckpointFormat("wavlm", ("cfg", "model"), "model"),
    "speaker_encoder": CheckpointFormat(
        "speaker_encoder", ("model_state",), "model_state", strict=False,
        ignored_extra=("similarity_weight", "similarity_bias"),
    ),
}


@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    extra: dict  # everything else at top level (cfg for WavLM, iteration, ...)


def read_checkpoint(path: str | os.PathLike, kind: str) -> LoadedCheckpoint:
    """Read an official file; returns the unprefixed state_dict and the other top-level entries."""
    fmt = FORMATS[kind]
    path = Path(path)
    try:
        # A zip-format file (torch >= 1.6) is memory-mapped: only the tensors the network takes are
        # read (wav2lip.pth and freevc.pth also hold optimizer state, twice the weights), straight
        # from the page cache. Older pickle-format files cannot be mapped and are read whole.
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for a bad file; name the file and the cause
        raise CheckpointFormatError(f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{path}: expected a dict at top level, found {type(raw).__name__}")
    missing = [k for k in fmt.required_top if k not in raw]
    if missing:
        raise CheckpointFormatError(f"{path}: not a {kind} checkpoint: top-level keys {sorted(raw)[:8]} lack {missing}")
    if fmt.state_key is None:
        state, extra = raw, {}
    else:
        state = raw[fmt.state_key]
        extra = {k: v for k, v in raw.items() if k != fmt.state_key}
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: '{fmt.state_key}' is not a state_dict")
    if fmt.prefix:
        state = {(k[len(fmt.prefix):] if k.startswith(fmt.prefix) else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in fmt.ignored_extra}
    return LoadedCheckpoint(state, extra)


def key_difference(actual: Iterable[str], expected: Iterable[str]) -> tuple[list[str], list[str]]:
    """(missing, unexpected) key lists, sorted."""
    a, e = set(actual), set(expected)
    return sorted(e - a), sorted(a - e)


def check_keys(state: dict, expected_shapes: dict[str, tuple[int, ...]], *, where: str, strict: bool = True) -> None:
    """Raise CheckpointFormatError naming the difference when keys or shapes do not match."""
    missing, unexpected = key_difference(state.keys(), expected_shapes.keys())
    if not strict:
        unexpected = []
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
    wrong = [k for k in expected_shapes if k in state and tuple(state[k].shape) != tuple(expected_shapes[k])]
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} != {tuple(expected_shapes[k])})")
    if problems:
        raise CheckpointFormatError(f"{where}: key set differs from the network: " + "; ".join(problems))


def write_checkpoint(path: str | os.PathLike, kind: str, state_dict: dict[str, torch.Tensor], *, cfg: dict | None = None) -> Path:
    """Write `state_dict` in the official layout of `kind`, atomically (tests and synthetic files)."""
    fmt = FORMATS[kind]
    path = Path(path)
    state = {fmt.prefix + k: v for k, v in state_dict.items()}
    if kind == "wav2lip":
        obj = {"state_dict": state, "optimizer": {}, "global_step": 0, "global_epoch": 0}
    elif kind == "s3fd":
        obj = state
    elif kind == "freevc":
        obj = {"model": state, "iteration": 0, "optimizer": None, "learning_rate": 2e-4}
    elif kind == "wavlm":
        if cfg is None:
            raise ValueError("a WavLM checkpoint needs its cfg dict")
        obj = {"cfg": cfg, "model": state}
    elif kind == "speaker_encoder":
        obj = {"step": 0, "model_state": state, "optimizer_state": None}
    else:
        raise KeyError(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
