"""What the try-it page needs beyond the API: the page itself, uploads into the storage root, and
reading a result back for playback. No Ray, no HTTP framework: the ingress's routes call these.

* An upload is a source video: it is held to the same limits as any source (max_input_bytes,
  then the probe's duration and resolution limits) and stored under `uploads/` in the storage
  root with a generated name, never the caller's.
* Playback reads only what the API could read anyway (the storage root and the allowed buckets,
  through `Storage`), only media files, and no more than max_input_bytes.
"""
from __future__ import annotations

import uuid
from functools import lru_cache
from pathlib import Path, PurePosixPath

from ..contract import UploadResult
from ..errors import InvalidURI
from ..settings import Settings

UPLOAD_FOLDER = "uploads"

# what the page may fetch for playback, by suffix
MEDIA_TYPES = {
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
    ".mkv": "video/x-matroska", ".wav": "audio/wav", ".mp3": "audio/mpeg", ".m4a": "audio/mp4",
}
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv")


@lru_cache(maxsize=1)
def page_html() -> str:
    return (Path(__file__).with_name("index.html")).read_text(encoding="utf-8")


def upload_uri(filename: str | None) -> str:
    """A fresh name under uploads/, keeping the caller's suffix only when it is a video suffix."""
    suffix = PurePosixPath(filename or "").suffix.lower()
    return f"{UPLOAD_FOLDER}/{uuid.uuid4().hex}{suffix if suffix in VIDEO_SUFFIXES else '.mp4'}"


def store_upload(data: bytes, filename: str | None, settings: Settings, storage) -> UploadResult:
    """Check an uploaded source like any source (422 not a video, 413 duration/resolution; its size
    was held to max_input_bytes by the edge as it was read), then write it under uploads/ with a
    generated name."""
    from ..checks import check_video

    info = check_video(data, settings).info
    uri = upload_uri(filename)
    storage.write_bytes(uri, data, overwrite=False)
    return UploadResult(uri=uri, bytes=len(data), duration_s=round(info.duration, 3), width=info.width,
                        height=info.height)


def media_type(uri: str) -> str:
    """The media type to answer for `uri`; InvalidURI (400) for anything that is not a media file."""
    suffix = PurePosixPath(uri.split("?", 1)[0]).suffix.lower()
    if suffix not in MEDIA_TYPES:
        raise InvalidURI(f"{uri!r} is not a media file ({', '.join(sorted(MEDIA_TYPES))})", field="uri")
    return MEDIA_TYPES[suffix]


def read_media(uri: str, settings: Settings, storage) -> tuple[bytes, str]:
    """The bytes of a media file the API may read (root / allowed buckets), and its media type."""
    kind = media_type(uri)
    return storage.read_bytes(uri, max_bytes=settings.limits.max_input_bytes), kind
