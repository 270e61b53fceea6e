"""Give a network its weights: the official file from the weights dir, or synthetic ones if allowed."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

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


class _SkipRandomInit(TorchFunctionMode):
    """While active, parameter initialisation does nothing: torch.nn.init's in-place fills (and
    Tensor.uniform_/normal_) return their tensor untouched, torch.randn/rand give torch.empty.

    Not the meta device: a meta-device randn or normal_ makes torch import its Python meta
    kernels (sympy, torch._dynamo, ~800 modules, 1.5-5 s of CPU at a replica's start)."""

    _CREATE_KWARGS = ("dtype", "device", "layout", "requires_grad", "pin_memory")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.uniform_, torch.Tensor.normal_) or (
                getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_")):
            return args[0] if args else kwargs["tensor"]
        if func in (torch.randn, torch.rand):
            return torch.empty(*args, **{k: v for k, v in kwargs.items() if k in self._CREATE_KWARGS})
        return func(*args, **kwargs)


def build_uninitialized(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The network `factory()` builds, on the CPU, with its tensors left uninitialised (their memory
    mostly never touched): for a network whose every tensor is then overwritten (a checkpoint with
    a strict key check, or the synthetic weights), torch's random initialisation is wasted start-up
    time, and a checkpoint loaded with assign=True then needs no second copy of the weights."""
    with _SkipRandomInit():
        return factory()


def load_weights(module: torch.nn.Module, *, kind: str, filename: str, weights_dir: str | Path,
                 allow_synthetic: bool, what: str) -> tuple[bool, LoadedCheckpoint | None]:
    """Load `filename` (official layout `kind`) into `module`; returns (synthetic, checkpoint).

    Missing file and synthetic not allowed -> WeightsMissing naming the file and the fetch command.
    """
    path = checkpoint_path(weights_dir, filename)
    if not path.is_file():
        if not allow_synthetic:
            searched = Path(weights_dir).resolve()
            raise WeightsMissing(
                f"{what} needs {searched / filename}, which is missing (weights folder searched: {searched}; "
                f"settings.runtime.weights_dir / LIPSERVE_WEIGHTS_DIR choose it). Fetch it with `lipserve weights fetch "
                f"{filename}` or place it there by hand; or set LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS=1 to run on "
                f"synthetic weights (output not meaningful)."
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
