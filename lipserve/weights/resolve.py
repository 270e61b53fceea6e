"""Give a network its weights: the official file from the weights dir, or synthetic ones if allowed."""
from __future__ import annotations

import logging
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
                f"settings.weights_dir / LIPSERVE_WEIGHTS_DIR choose it). Fetch it with `lipserve weights fetch "
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
