"""One lip-sync request's options, and the rules they must keep."""
from __future__ import annotations

from dataclasses import dataclass

from ..contract import FACE_MODES, MAX_PAD, MAX_RESIZE_FACTOR
from ..errors import InvalidField


@dataclass
class LipSyncOptions:
    """One request's lip-sync options; None = this stage's setting of the same name (LipSyncer.resolve)."""

    face_mode: str | None = None        # auto | static | track | box
    box: tuple[int, int, int, int] | None = None   # x1, y1, x2, y2 in source pixels
    pads: tuple[int, int, int, int] | None = None  # top, bottom, left, right
    resize_factor: int | None = None
    track_every: int = 5


def check_options(options: LipSyncOptions) -> None:
    """InvalidField for an option out of range; `options` as LipSyncer.resolve returns them (the
    request's fields met the same rules, lipserve.contract's, at the ingress; here the stage's own
    defaults and a library caller's options meet them)."""
    if options.face_mode not in FACE_MODES:
        raise InvalidField(f"face_mode must be one of {', '.join(FACE_MODES)}, not {options.face_mode!r}",
                           field="options.face_mode")
    if not (isinstance(options.resize_factor, int) and 1 <= options.resize_factor <= MAX_RESIZE_FACTOR):
        raise InvalidField(f"resize_factor must be an integer from 1 to {MAX_RESIZE_FACTOR}", field="options.resize_factor")
    if len(options.pads) != 4 or any(not 0 <= int(p) <= MAX_PAD for p in options.pads):
        raise InvalidField(f"pads must be four integers within 0..{MAX_PAD} (top, bottom, left, right)",
                           field="options.pads")
    if options.face_mode == "box" and options.box is None:
        raise InvalidField("face_mode 'box' needs options.box", field="options.box")
    if options.face_mode in ("track", "auto") and options.track_every < 1:
        raise InvalidField("track_every must be at least 1", field="options.track_every")
