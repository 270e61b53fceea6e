"""Download checkpoint files: resume, progress bar, size + sha256 check, atomic rename.

The download goes to `<file>.part` next to the final file. An interrupted transfer is resumed
with an HTTP Range request; the final name appears only after size and hash match (os.replace),
so a half or wrong file never sits where a stage would load it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests

from .manifest import Manifest, WeightEntry

log = logging.getLogger("lipserve.weights")

BASE_URL_ENV = "LIPSERVE_WEIGHTS_BASE_URL"  # a mirror: <base>/<file> replaces the manifest URLs
READ_CHUNK = 1024 * 1024
CONNECT_TIMEOUT_S = 10.0  # a machine without internet fails at DNS/connect, long before this
READ_TIMEOUT_S = 60.0
RESUME_ATTEMPTS = 5  # re-connections per URL after the body was cut


class FetchError(RuntimeError):
    """A file could not be fetched or failed its checks (the message says what to do)."""


class NoNetwork(FetchError):
    """No URL of a file could be reached at all."""


class SizeMismatch(FetchError):
    pass


class ChecksumMismatch(FetchError):
    pass


@dataclass
class FetchResult:
    file: str
    path: Path
    status: str  # fetched | present
    size: int
    sha256: str
    url: str | None = None
    resumed_from: int = 0  # bytes already in .part when the download (re)started
    recorded: bool = False  # sha256 written into the manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def urls_for(entry: WeightEntry, override: str | None = None) -> list[str]:
    """Where to download `entry` from: an explicit override, a mirror base URL, or the manifest."""
    if override:
        return [override]
    base = os.environ.get(BASE_URL_ENV)
    if base:
        return [base.rstrip("/") + "/" + entry.file]
    return list(entry.urls)


def manual_instructions(entry: WeightEntry, dest: Path) -> str:
    size = f"{entry.size} bytes" if entry.size else (entry.approx_size or "size not published")
    where = "\n".join(f"      {u}" for u in entry.urls)
    return (f"  Place it by hand: on a machine with internet download it from one of\n{where}\n"
            f"  and copy it to {dest / entry.file} ({size}); then run `lipserve weights verify`.")


def check_file(entry: WeightEntry, path: Path, *, digest: str | None = None) -> str:
    """Size and hash checks against the manifest; returns the sha256. Raises SizeMismatch/ChecksumMismatch."""
    size = path.stat().st_size
    if entry.size and size != entry.size:
        raise SizeMismatch(f"{entry.file}: got {size} bytes, the manifest says {entry.size} (truncated or not the published file)")
    digest = digest or sha256_of(path)
    if entry.sha256 and digest != entry.sha256:
        raise ChecksumMismatch(f"{entry.file}: sha256 {digest} does not match the manifest's {entry.sha256}")
    if not entry.sha256 and entry.sha256_prefix and not digest.startswith(entry.sha256_prefix):
        raise ChecksumMismatch(f"{entry.file}: sha256 {digest} does not start with the published {entry.sha256_prefix}")
    return digest


def fetch_entry(entry: WeightEntry, dest: str | os.PathLike, *, url_override: str | None = None,
                manifest: Manifest | None = None, record_sha256: bool = False, progress: bool = True,
                session: requests.Session | None = None, connect_timeout: float = CONNECT_TIMEOUT_S,
                read_timeout: float = READ_TIMEOUT_S) -> FetchResult:
    """Make `dest/entry.file` the verified file. Skips the download when it is already there and checks out."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / entry.file
    part = dest / (entry.file + ".part")

    if final.is_file():
        try:
            digest = check_file(entry, final)
            return FetchResult(entry.file, final, "present", final.stat().st_size, digest)
        except (SizeMismatch, ChecksumMismatch) as exc:
            log.warning("%s is present but fails its check (%s); downloading it again", final, exc)

    session = session or requests.Session()
    failures: list[str] = []
    unreachable = 0
    urls = urls_for(entry, url_override)
    bad_content: FetchError | None = None
    for url in urls:
        try:
            resumed_from = _download(url, part, entry, session, progress, (connect_timeout, read_timeout))
            digest = check_file(entry, part)
        except _Unreachable as exc:
            unreachable += 1
            failures.append(f"{url}: {exc}")
            continue
        except (SizeMismatch, ChecksumMismatch) as exc:
            part.unlink(missing_ok=True)  # wrong bytes: never resume from them; try the next mirror
            bad_content = exc
            failures.append(f"{url}: {exc}")
            continue
        except FetchError as exc:
            failures.append(f"{url}: {exc}")
            continue
        _fsync(part)
        os.replace(part, final)
        recorded = False
        if record_sha256 and not entry.sha256:
            if manifest is None:
                raise FetchError("--record-sha256 needs the manifest the entry came from")
            manifest.record(entry.file, sha256=digest, size=final.stat().st_size, source=url)
            recorded = True
            log.info("recorded sha256 %s for %s in %s", digest, entry.file, manifest.path)
        return FetchResult(entry.file, final, "fetched", final.stat().st_size, digest, url, resumed_from, recorded)

    detail = "\n".join(f"  - {f}" for f in failures) or "  (no URL to try)"
    if urls and unreachable == len(urls):
        raise NoNetwork(
            f"No network: could not reach any download location for {entry.file}; this machine "
            f"seems to have no internet access.\n{detail}\n{manual_instructions(entry, dest)}")
    error = type(bad_content) if bad_content is not None else FetchError
    raise error(f"could not fetch {entry.file}:\n{detail}\n{manual_instructions(entry, dest)}")


class _Unreachable(Exception):
    """The server could not be reached at all (DNS, refused, connect timeout)."""


def _download(url: str, part: Path, entry: WeightEntry, session: requests.Session, progress: bool,
              timeout: tuple[float, float]) -> int:
    """Fill `part` with the whole body of `url`, resuming after cuts. Returns the offset first resumed from."""
    from tqdm import tqdm

    first_offset = part.stat().st_size if part.exists() else 0
    attempts = 0
    bar = None
    try:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if entry.size and offset > entry.size:  # not a prefix of this file: start over
                part.unlink()
                offset = 0
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                response = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempts == 0:
                    raise _Unreachable(_short(exc)) from exc
                raise FetchError(f"connection lost and could not be re-established ({_short(exc)})") from exc
            with response:
                if response.status_code == 416:  # range starts at/after the end: the .part is whole or too long
                    total = _total_from_416(response)
                    if total is not None and total == offset:
                        return first_offset
                    part.unlink(missing_ok=True)
                    if total is not None and total < offset:
                        continue
                    raise FetchError(f"server refused the range request (416) at offset {offset}")
                if response.status_code not in (200, 206):
                    raise FetchError(f"HTTP {response.status_code} {response.reason}")
                if response.status_code == 206:
                    start, total = _content_range(response)
                    if start != offset:
                        raise FetchError(f"server resumed at byte {start}, asked for {offset}")
                    mode = "ab"
                else:  # 200: the server ignored Range (or we asked from 0): write from the start
                    offset, total, mode = 0, _int(response.headers.get("Content-Length")), "wb"
                if entry.size and total is not None and total != entry.size:
                    part.unlink(missing_ok=True)
                    raise SizeMismatch(f"{entry.file}: the server offers {total} bytes, the manifest says "
                                       f"{entry.size} (truncated or not the published file)")
                if bar is None:
                    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=entry.file, disable=not progress, leave=False)
                else:
                    bar.reset(total=total)
                    bar.update(offset)
                try:
                    with open(part, mode) as out:
                        for chunk in response.iter_content(READ_CHUNK):
                            out.write(chunk)
                            bar.update(len(chunk))
                except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as exc:
                    attempts += 1
                    if attempts > RESUME_ATTEMPTS:
                        raise FetchError(f"connection cut {attempts} times; {part} kept for the next run ({_short(exc)})") from exc
                    log.warning("%s: connection cut at byte %d (%s); resuming", entry.file, part.stat().st_size, _short(exc))
                    time.sleep(min(2.0 ** attempts * 0.1, 5.0))
                    continue
            have = part.stat().st_size if part.exists() else 0
            if total is not None and have < total:
                # the server closed the body early without an error: resume from where we are
                attempts += 1
                if attempts > RESUME_ATTEMPTS:
                    raise FetchError(f"body ended at byte {have} of {total} {attempts} times; {part} kept")
                continue
            return first_offset
    finally:
        if bar is not None:
            bar.close()


def _content_range(response) -> tuple[int, int | None]:
    m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
    if not m:
        raise FetchError(f"206 without a usable Content-Range ({response.headers.get('Content-Range')!r})")
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _total_from_416(response) -> int | None:
    m = re.match(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def _int(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _short(exc: Exception) -> str:
    text = str(exc)
    reason = re.search(r"\[Errno -?\d+\] [^'\")]+|Name or service not known|Temporary failure in name resolution|timed out", text)
    host = urlparse(getattr(getattr(exc, "request", None), "url", "") or "").hostname
    core = reason.group(0) if reason else text[:200]
    return f"{type(exc).__name__}: {core}" + (f" ({host})" if host else "")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
