"""Give a network its weights: the official file from the weights dir, or synthetic ones if allowed."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import WeightsMissing
from .formats import LoadedCheckpoint, check_keys, read_checkpoint
from .synthetic import fill_synthetic

log = logging.getLogger("lipserve.weights")

SYNTHETIC_WARNING = (
    "SYNTHETIC WEIGHTS: {what} runs on deterministic synthetic weights because {file} is missing. "
    "The architecture is real; the OUTPUT IS NOT MEANINGFUL. Fetch the checkpoints with `lipserve weights fetch`."
)


def checkpoint_path(weights_dir: str | Path, filename: str) -> Path:
    return Path(weights_dir) / filename


def build_uninitialized(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The network `factory()` builds, with uninitialised CPU tensors instead of torch's random
    initialisation: for a network whose every tensor is then overwritten by `load_weights`
    (a checkpoint, strict key check, or the synthetic weights), that initialisation is wasted
    start-up time. Only for networks that keep all their state in parameters and buffers."""
    with torch.device("meta"):
        module = factory()
    return module.to_empty(device="cpu")


def load_weights(module: torch.nn.Module, *, kind: str, filename: str, weights_dir: str | Path,
                 allow_synthetic: bool, what: str) -> tuple[bool, LoadedCheckpoint | None]:
    """Load `filename` (official layout `kind`) into `module`; returns (synthetic, checkpoint).

    Missing file and synthetic not allowed -> WeightsMissing naming the file and the fetch command.
    """
    path = checkpoint_path(weights_dir, filename)
    if not path.is_file():
        if not allow_synthetic:
            raise WeightsMissing(
                f"{what} needs {path} (missing). Fetch it with `lipserve weights fetch {filename}` "
                f"or place it there by hand; or set LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS=1 to run on synthetic weights (output not meaningful)."
            )
        log.warning(SYNTHETIC_WARNING.format(what=what, file=path))
        fill_synthetic(module)
        return True, None
    ckpt = read_checkpoint(path, kind)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    strict = kind != "speaker_encoder"
    check_keys(ckpt.state_dict, expected, where=str(path), strict=strict)
    module.load_state_dict(ckpt.state_dict, strict=strict)
    log.info("%s: loaded %s", what, path)
    return False, ckpt


def load_concurrently(loaders: dict) -> tuple[dict, dict[str, float]]:
    """Run independent loaders at once ({name: () -> result}); ({name: result}, {name: seconds}).

    Reading a checkpoint, building a network and filling synthetic weights mostly run in torch
    and numpy with the GIL released, so a stage's models load side by side. The first failure
    is raised (after the others finished)."""
    from concurrent.futures import ThreadPoolExecutor

    def timed(load):
        start = time.perf_counter()
        result = load()
        return result, time.perf_counter() - start

    if not loaders:
        return {}, {}
    with ThreadPoolExecutor(max_workers=len(loaders), thread_name_prefix="load") as pool:
        futures = {name: pool.submit(timed, load) for name, load in loaders.items()}
        done = {name: future.result() for name, future in futures.items()}
    return {name: result for name, (result, _) in done.items()}, {name: s for name, (_, s) in done.items()}
