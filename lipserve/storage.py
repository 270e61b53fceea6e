"""Where source videos come from and results go: `gs://bucket/object` or a path under the local root.

One interface, two backends. The rules every caller relies on:

* reads check the size from metadata (GCS `reload()`, local `stat`) before downloading anything;
* local paths cannot leave `settings.storage.storage_root` (`..`, absolute paths and symlinks are
  resolved and checked);
* a GCS bucket must be on `settings.storage.allowed_buckets`;
* writes are atomic: the final object appears whole or not at all (local: temp file in the same
  folder, then a rename; GCS: a resumable upload only becomes an object when its last chunk lands,
  and we verify the size afterwards);
* an existing output is never replaced unless `overwrite=True` (GCS: `if_generation_match=0`).

Failures are the named errors of `lipserve.errors`; the storage client's own exceptions never
leak out.
"""
from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import (
    BucketNotAllowed,
    Forbidden,
    InputTooLarge,
    InvalidURI,
    OutputExists,
    PathEscape,
    SourceNotFound,
    StorageUnavailable,
)
from .settings import Settings

log = logging.getLogger("lipserve.storage")

# GCS resumable uploads send chunks that are multiples of 256 KiB; objects larger than one chunk
# go up in several requests, so a dropped connection costs one chunk, not the whole file.
UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024
# Local copies are streamed in this many bytes at a time.
COPY_CHUNK_BYTES = 1024 * 1024
# Project id used with the emulator (it ignores it, the client insists on one).
EMULATOR_PROJECT = "lipserve-emulator"

# GCS bucket naming rules, simplified: 3..63 (222 with dots) lowercase letters, digits, - _ .
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


@dataclass(frozen=True)
class Location:
    """A parsed URI: either a GCS object or a local file (already resolved inside the root)."""

    uri: str
    bucket: str | None = None
    name: str | None = None
    path: Path | None = None

    @property
    def is_gcs(self) -> bool:
        return self.bucket is not None


class Storage:
    def __init__(self, settings: Settings, gcs_client=None):
        self.settings = settings
        self.root = Path(settings.storage.storage_root).expanduser().resolve()
        self._gcs = gcs_client
        self.timeout = float(settings.storage.storage_timeout_s)

    # ---------------------------------------------------------------- public API

    def read_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """The whole object. 400/403/404/413/502 as named errors; size checked before reading."""
        limit = self.settings.limits.max_input_bytes if max_bytes is None else max_bytes
        loc = self.parse(uri)
        if loc.is_gcs:
            return self._gcs_read(loc, limit)
        return self._local_read(loc, limit)

    def check_output(self, uri: str, *, overwrite: bool) -> None:
        """Pre-flight for a write (before the heavy work): bad URI 400, not allowed 403, exists 409."""
        loc = self.parse(uri)
        if loc.is_gcs:
            if overwrite:
                return
            blob = self._bucket(loc).blob(loc.name)
            exists = self._call(lambda: blob.exists(timeout=self.timeout, retry=self._retry()), loc)
            if exists:
                raise OutputExists(f"{uri} already exists; set options.overwrite to replace it", field="output_video_gs")
            return
        if loc.path.is_dir():
            raise InvalidURI(f"{uri} is a directory, not a file", field="output_video_gs")
        if loc.path.exists() and not overwrite:
            raise OutputExists(f"{uri} already exists; set options.overwrite to replace it", field="output_video_gs")

    def write_bytes(self, uri: str, data: bytes, *, overwrite: bool, content_type: str = "video/mp4") -> str:
        """Write `data` atomically; returns the URI written. OutputExists (409) unless overwrite."""
        return self.write_stream(uri, io.BytesIO(data), size=len(data), overwrite=overwrite, content_type=content_type)

    def write_stream(self, uri: str, stream: BinaryIO, *, size: int, overwrite: bool,
                     content_type: str = "video/mp4") -> str:
        """Like write_bytes, from a readable binary stream of exactly `size` bytes.

        If the stream fails part-way (OSError), that is a StorageUnavailable and nothing is left behind.
        """
        loc = self.parse(uri)
        if loc.is_gcs:
            self._gcs_write(loc, stream, size, overwrite, content_type)
        else:
            self._local_write(loc, stream, size, overwrite)
        return uri

    # ---------------------------------------------------------------- URIs

    def parse(self, uri: str) -> Location:
        """Split a URI into a GCS object or a local path inside the root (InvalidURI / BucketNotAllowed / PathEscape)."""
        if not isinstance(uri, str) or not uri.strip():
            raise InvalidURI("empty location: give gs://bucket/object or a path under the storage root")
        uri = uri.strip()
        if uri.startswith("gs://"):
            return self._parse_gcs(uri)
        if uri.startswith("file://"):
            return Location(uri, path=self._inside_root(uri[len("file://"):], uri))
        if "://" in uri:
            scheme = uri.split("://", 1)[0]
            raise InvalidURI(f"{uri!r}: scheme {scheme!r} is not supported (use gs://bucket/object or a local path)")
        return Location(uri, path=self._inside_root(uri, uri))

    def _parse_gcs(self, uri: str) -> Location:
        rest = uri[len("gs://"):]
        bucket, _, name = rest.partition("/")
        if not bucket:
            raise InvalidURI(f"{uri!r}: no bucket (expected gs://bucket/object)")
        if not _BUCKET_RE.match(bucket):
            raise InvalidURI(f"{uri!r}: {bucket!r} is not a valid bucket name")
        if not name or name.endswith("/"):
            raise InvalidURI(f"{uri!r}: no object name (expected gs://bucket/object)")
        if len(name.encode("utf-8")) > 1024 or "\n" in name or "\r" in name:
            raise InvalidURI(f"{uri!r}: object name is too long or has line breaks")
        if not self.settings.storage.bucket_allowed(bucket):
            allowed = ", ".join(self.settings.storage.allowed_buckets) or "none"
            raise BucketNotAllowed(f"bucket {bucket!r} is not on the allow-list (allowed: {allowed})")
        return Location(uri, bucket=bucket, name=name)

    def _inside_root(self, raw: str, uri: str) -> Path:
        """Resolve a local path (following symlinks) and refuse it unless it stays inside the root."""
        if "\x00" in raw:
            raise InvalidURI(f"{uri!r}: path contains a NUL byte")
        given = Path(raw).expanduser()
        if ".." in given.parts:
            raise PathEscape("'..' is not allowed in storage paths")
        candidate = given if given.is_absolute() else self.root / given
        resolved = candidate.resolve(strict=False)  # follows every symlink on the way
        if resolved != self.root and not resolved.is_relative_to(self.root):
            # where it resolves to and where the root is are the server's business, not the caller's
            raise PathEscape(f"{uri!r} is outside the storage root")
        if resolved == self.root:
            raise InvalidURI(f"{uri!r} names the storage root itself, not a file")
        return resolved

    # ---------------------------------------------------------------- local backend

    def _local_read(self, loc: Location, limit: int) -> bytes:
        try:
            st = loc.path.stat()
        except FileNotFoundError:
            raise SourceNotFound(f"{loc.uri} does not exist") from None
        except OSError as exc:
            raise StorageUnavailable(f"{loc.uri}: cannot stat ({exc})") from exc
        if not loc.path.is_file():
            raise SourceNotFound(f"{loc.uri} is not a regular file")
        if st.st_size > limit:
            raise InputTooLarge(f"{loc.uri} is {st.st_size} bytes; the limit is {limit}")
        try:
            with open(loc.path, "rb") as f:
                data = f.read(limit + 1)  # never more than the limit, even if it grew since stat
        except OSError as exc:
            raise StorageUnavailable(f"{loc.uri}: cannot read ({exc})") from exc
        if len(data) > limit:
            raise InputTooLarge(f"{loc.uri} is larger than the limit of {limit} bytes")
        return data

    def _local_write(self, loc: Location, stream: BinaryIO, size: int, overwrite: bool) -> None:
        final = loc.path
        if final.is_dir():
            raise InvalidURI(f"{loc.uri} is a directory, not a file")
        if final.exists() and not overwrite:
            raise OutputExists(f"{loc.uri} already exists; set options.overwrite to replace it")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"{loc.uri}: cannot create its folder ({exc})") from exc
        # same folder as the target, so the rename below is atomic (same file system)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                written = _copy(stream, out, size)
                out.flush()
                os.fsync(out.fileno())
            if written != size:
                raise StorageUnavailable(f"{loc.uri}: wrote {written} bytes, expected {size}")
            if overwrite:
                os.replace(tmp, final)
            else:
                _publish_no_clobber(tmp, final, loc.uri)
        except OSError as exc:
            raise StorageUnavailable(f"{loc.uri}: write failed ({exc})") from exc
        finally:
            tmp.unlink(missing_ok=True)  # gone already after a rename; removed after a failure

    # ---------------------------------------------------------------- GCS backend

    @property
    def gcs(self):
        """The storage client, made on first use (so local-only use never needs credentials)."""
        if self._gcs is None:
            from google.cloud import storage as gcs_storage

            try:
                if os.environ.get("STORAGE_EMULATOR_HOST"):
                    from google.auth.credentials import AnonymousCredentials

                    self._gcs = gcs_storage.Client(project=self.settings.storage.gcs_project or EMULATOR_PROJECT,
                                                   credentials=AnonymousCredentials())
                else:
                    self._gcs = gcs_storage.Client(project=self.settings.storage.gcs_project)
            except Exception as exc:  # google.auth raises several types when no credentials are found
                raise StorageUnavailable(f"cannot create the GCS client: {type(exc).__name__}: {exc}") from exc
        return self._gcs

    def _retry(self):
        # the library retries transient errors for up to 120 s by default; an outage must surface
        # within our own timeout instead
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_timeout(self.timeout)

    def _bucket(self, loc: Location):
        return self.gcs.bucket(loc.bucket)

    def _call(self, fn, loc: Location, *, reading: bool = False):
        """Run one client call, turning the library's exceptions into our named errors.

        `reading`: a failed precondition means the object changed under us, not "output exists".
        """
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc
        import requests

        try:
            return fn()
        except gexc.NotFound as exc:
            raise SourceNotFound(f"{loc.uri} does not exist") from exc
        except gexc.PreconditionFailed as exc:
            if reading:
                raise StorageUnavailable(f"{loc.uri} changed while it was being read; try again") from exc
            raise OutputExists(f"{loc.uri} already exists; set options.overwrite to replace it") from exc
        except (gexc.Forbidden, gexc.Unauthorized) as exc:
            raise Forbidden(f"{loc.uri}: storage refused access ({exc.code} {exc.message})") from exc
        except gexc.RetryError as exc:
            raise StorageUnavailable(f"{loc.uri}: storage unreachable within {self.timeout:g} s ({exc.cause or exc})") from exc
        except gexc.GoogleAPICallError as exc:  # 5xx and any other status the server answers
            raise StorageUnavailable(f"{loc.uri}: storage error {exc.code}: {exc.message}") from exc
        except (requests.RequestException, auth_exc.TransportError, auth_exc.DefaultCredentialsError,
                OSError) as exc:  # OSError: sockets, and a source stream that breaks mid-upload
            raise StorageUnavailable(f"{loc.uri}: storage unreachable ({type(exc).__name__}: {exc})") from exc

    def _gcs_read(self, loc: Location, limit: int) -> bytes:
        blob = self._bucket(loc).blob(loc.name)
        self._call(lambda: blob.reload(timeout=self.timeout, retry=self._retry()), loc)
        if blob.size is not None and blob.size > limit:
            raise InputTooLarge(f"{loc.uri} is {blob.size} bytes; the limit is {limit}")
        # pin the generation we measured, so a replaced object cannot slip past the size check
        data = self._call(lambda: blob.download_as_bytes(if_generation_match=blob.generation,
                                                         timeout=self.timeout, retry=self._retry()), loc,
                          reading=True)
        if len(data) > limit:
            raise InputTooLarge(f"{loc.uri} is larger than the limit of {limit} bytes")
        return data

    def _gcs_write(self, loc: Location, stream: BinaryIO, size: int, overwrite: bool, content_type: str) -> None:
        blob = self._bucket(loc).blob(loc.name, chunk_size=UPLOAD_CHUNK_BYTES)
        # generation 0 = "only if no live object": the server refuses to clobber, with no race
        precondition = None if overwrite else 0
        self._call(lambda: blob.upload_from_file(stream, size=size, content_type=content_type,
                                                 if_generation_match=precondition,
                                                 timeout=self.timeout, retry=self._retry()), loc)
        self._call(lambda: blob.reload(timeout=self.timeout, retry=self._retry()), loc)
        if blob.size != size:
            # should not happen: the upload finished but the object is not what we sent; remove it
            generation = blob.generation
            self._call(lambda: blob.delete(if_generation_match=generation, timeout=self.timeout,
                                           retry=self._retry()), loc)
            raise StorageUnavailable(f"{loc.uri}: stored {blob.size} bytes, sent {size}; the object was removed")


def _copy(src: BinaryIO, dst: BinaryIO, size: int) -> int:
    written = 0
    while written < size:
        chunk = src.read(min(COPY_CHUNK_BYTES, size - written))
        if not chunk:
            break
        dst.write(chunk)
        written += len(chunk)
    return written


def _publish_no_clobber(tmp: Path, final: Path, uri: str) -> None:
    """Move tmp to final unless final exists, atomically where the file system allows hard links."""
    try:
        os.link(tmp, final)  # fails with FileExistsError if someone else wrote it meanwhile
    except FileExistsError:
        raise OutputExists(f"{uri} already exists; set options.overwrite to replace it") from None
    except OSError:
        # no hard links here (some network/FUSE file systems): check, then rename
        if final.exists():
            raise OutputExists(f"{uri} already exists; set options.overwrite to replace it") from None
        os.replace(tmp, final)
