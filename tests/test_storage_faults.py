"""Storage when the GCS server fails part-way (no Ray): the emulator killed in the middle of an
upload or a download, or hanging. Always a named 502 in bounded time, never a partial object,
and the next call after the server is back works."""
from __future__ import annotations

import itertools
import os
import time

import pytest

from lipserve.errors import StorageUnavailable
from lipserve.settings import Settings
from lipserve.storage import Storage

STORAGE_TIMEOUT_S = 2.0
_names = itertools.count()


@pytest.fixture
def flaky(flaky_gcs, tmp_path, monkeypatch):
    """A bucket on the restartable emulator and a Storage that reaches it through the link."""
    bucket = f"faults-{os.getpid()}-{next(_names)}"
    flaky_gcs.client.create_bucket(bucket)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", flaky_gcs.url)
    storage = Storage(Settings(storage_root=tmp_path, allowed_buckets=[bucket], storage_timeout_s=STORAGE_TIMEOUT_S))
    yield flaky_gcs, bucket, storage
    flaky_gcs.link.disarm()
    if not flaky_gcs.emulator.running:
        flaky_gcs.emulator.start()


def _objects(flaky_gcs, bucket) -> list[tuple[str, int]]:
    return sorted((b.name, b.size) for b in flaky_gcs.client.list_blobs(bucket))


def test_emulator_killed_part_way_through_an_upload(flaky):
    gcs, bucket, storage = flaky
    data = os.urandom(300_000)
    fired = gcs.link.arm(f"/upload/storage/v1/b/{bucket}/o".encode(), gcs.emulator.stop, request_bytes=4096)
    t = time.perf_counter()
    with pytest.raises(StorageUnavailable) as info:
        storage.write_bytes(f"gs://{bucket}/out/a.mp4", data, overwrite=False)
    elapsed = time.perf_counter() - t
    assert fired.is_set(), "the upload never reached the link"
    assert info.value.status == 502 and "storage" in info.value.message
    assert elapsed < 6 * STORAGE_TIMEOUT_S + 5, elapsed
    gcs.emulator.start()
    assert _objects(gcs, bucket) == [], "nothing half-written"
    storage.write_bytes(f"gs://{bucket}/out/a.mp4", data, overwrite=False)  # storage is back: it works
    assert _objects(gcs, bucket) == [("out/a.mp4", len(data))]


def test_emulator_killed_part_way_through_a_download(flaky):
    gcs, bucket, storage = flaky
    data = os.urandom(200_000)
    gcs.client.bucket(bucket).blob("in/src.mp4").upload_from_string(data)
    fired = gcs.link.arm(f"/download/storage/v1/b/{bucket}/o/in%2Fsrc.mp4".encode(), gcs.emulator.stop,
                         response_bytes=20_000)
    with pytest.raises(StorageUnavailable) as info:
        storage.read_bytes(f"gs://{bucket}/in/src.mp4")
    assert fired.is_set(), "the download never reached the link"
    assert info.value.status == 502
    gcs.emulator.start()
    assert storage.read_bytes(f"gs://{bucket}/in/src.mp4") == data


def test_hanging_storage_answers_502_within_the_timeout(flaky):
    gcs, bucket, storage = flaky
    gcs.client.bucket(bucket).blob("in/src.mp4").upload_from_string(b"x" * 1000)
    gcs.emulator.freeze()
    try:
        t = time.perf_counter()
        with pytest.raises(StorageUnavailable):
            storage.read_bytes(f"gs://{bucket}/in/src.mp4")
        elapsed = time.perf_counter() - t
    finally:
        gcs.emulator.thaw()
    assert STORAGE_TIMEOUT_S * 0.9 <= elapsed < 4 * STORAGE_TIMEOUT_S + 5, elapsed
    assert storage.read_bytes(f"gs://{bucket}/in/src.mp4") == b"x" * 1000
