"""Quiet logging: our INFO lines, not numba/urllib3/google/torch chatter."""
from __future__ import annotations

import logging
import warnings

_NOISY = ("numba", "urllib3", "google", "google.auth", "google.resumable_media", "torch",
          "librosa", "matplotlib", "PIL", "filelock", "httpx", "httpcore", "onnxruntime", "piper")


def configure_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lipserve").setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for mod in ("torch", "librosa", "numba", "google"):
        warnings.filterwarnings("ignore", module=mod)
