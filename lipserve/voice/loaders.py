"""Load the voice stage's encoders from the official files, or synthetic weights when allowed.

| network         | file                        | layout (weights/formats.py)                 |
| WavLM-Large     | WavLM-Large.pt              | {'cfg', 'model'}: built from cfg, strict     |
| speaker encoder | pretrained_bak_5805000.pt   | {'step', 'model_state', ...}: non-strict     |
"""
from __future__ import annotations

import json
import logging
from importlib import resources

import torch

from ..models.speaker_encoder import SpeakerEncoder
from ..models.wavlm import WavLM
from ..settings import Settings
from ..weights.formats import CheckpointFormatError, check_keys, read_checkpoint
from ..weights.resolve import build_uninitialized, checkpoint_path, load_weights

log = logging.getLogger("lipserve.voice")

WAVLM_FILE = "WavLM-Large.pt"
SPEAKER_ENCODER_FILE = "pretrained_bak_5805000.pt"


def wavlm_large_config() -> dict:
    """The WavLM-Large cfg shipped with the package (the structure of the official file's cfg)."""
    text = resources.files("lipserve.models").joinpath("configs/wavlm_large.json").read_text()
    return json.loads(text)


def load_wavlm(settings: Settings, device: torch.device | str = "cpu") -> tuple[WavLM, bool]:
    """(WavLM in eval mode on `device`, synthetic). Missing file -> WeightsMissing unless synthetic is allowed."""
    path = checkpoint_path(settings.runtime.weights_dir, WAVLM_FILE)
    if path.is_file():
        ckpt = read_checkpoint(path, "wavlm")
        cfg = ckpt.extra["cfg"]
        if not isinstance(cfg, dict):
            raise CheckpointFormatError(f"{path}: 'cfg' is a {type(cfg).__name__}, expected a dict")
        # Built without initialising (its memory never touched), then handed the checkpoint's tensors:
        # one copy of 1.2 GB, not two.
        try:
            model = build_uninitialized(lambda: WavLM(cfg))
        except (ValueError, TypeError, SyntaxError) as exc:  # a cfg this architecture cannot be built from
            raise CheckpointFormatError(f"{path}: unusable WavLM cfg ({exc})") from exc
        check_keys(ckpt.state_dict, {k: tuple(v.shape) for k, v in model.state_dict().items()}, where=str(path))
        model.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()}, strict=True, assign=True)
        log.info("WavLM: loaded %s", path)
        synthetic = False
    else:
        # every tensor is overwritten by the synthetic weights (strict), so skip initialisation
        model = build_uninitialized(lambda: WavLM(wavlm_large_config()))
        # raises WeightsMissing (naming the file and the fetch command) unless synthetic weights are allowed
        synthetic, _ = load_weights(model, kind="wavlm", filename=WAVLM_FILE, weights_dir=settings.runtime.weights_dir,
                                    allow_synthetic=settings.runtime.allow_synthetic_weights, what="WavLM content encoder")
        if not synthetic:  # the file appeared meanwhile; build from its own cfg instead
            return load_wavlm(settings, device)
    return model.to(device).eval().requires_grad_(False), synthetic


def load_speaker_encoder(settings: Settings, device: torch.device | str = "cpu") -> tuple[SpeakerEncoder, bool]:
    """(SpeakerEncoder in eval mode on `device`, synthetic); the file's extra similarity_* keys are ignored."""
    model = build_uninitialized(SpeakerEncoder)  # every tensor is loaded next
    synthetic, _ = load_weights(model, kind="speaker_encoder", filename=SPEAKER_ENCODER_FILE,
                                weights_dir=settings.runtime.weights_dir, allow_synthetic=settings.runtime.allow_synthetic_weights,
                                what="speaker encoder")
    return model.to(device).eval().requires_grad_(False), synthetic
