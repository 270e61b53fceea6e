"""Storage against a real GCS emulator (fake-gcs-server) and the local file system."""
from __future__ import annotations

import io
import os
import socket

import pytest

from lipserve.errors import (
    BucketNotAllowed,
    InputTooLarge,
    InvalidURI,
    OutputExists,
    PathEscape,
    SourceNotFound,
    StorageUnavailable,
)
from lipserve.settings import Settings
from lipserve.storage import UPLOAD_CHUNK_BYTES, Storage


class FailingStream(io.BytesIO):
    """A seekable stream of `size` bytes whose reads raise once `fail_after` bytes were handed out."""

    def __init__(self, size: int, fail_after: int):
        super().__init__(os.urandom(size))
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.tell() >= self.fail_after:
            raise OSError("source stream broke mid-upload")
        return super().read(n)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens after the with-block


@pytest.fixture
def gcs(tmp_path, make_bucket, gcs_settings_factory):
    bucket = make_bucket("st")
    return Storage(gcs_settings_factory(tmp_path, [bucket])), bucket


# ------------------------------------------------------------------ GCS


def test_gcs_round_trip_large_object_uses_resumable_upload(gcs, gcs_client):
    storage, bucket = gcs
    data = os.urandom(UPLOAD_CHUNK_BYTES + 3 * 1024 * 1024 + 17)  # > 8 MiB: more than one chunk
    # observe (not alter) the requests the client sends, to see the resumable protocol in use
    urls = []
    storage.gcs._http.hooks["response"].append(lambda r, *a, **k: urls.append(r.request.url))
    uri = f"gs://{bucket}/videos/out.mp4"
    assert storage.write_bytes(uri, data, overwrite=False) == uri
    assert any("uploadType=resumable" in u for u in urls), urls
    blob = gcs_client.bucket(bucket).get_blob("videos/out.mp4")
    assert blob.size == len(data) and blob.content_type == "video/mp4"
    assert storage.read_bytes(uri, max_bytes=len(data)) == data


def test_gcs_missing_source_is_404(gcs):
    storage, bucket = gcs
    with pytest.raises(SourceNotFound) as e:
        storage.read_bytes(f"gs://{bucket}/nothing-here.mp4")
    assert e.value.status == 404 and "nothing-here.mp4" in e.value.message


def test_gcs_existing_output_is_409_and_overwrite_replaces(gcs, gcs_client):
    storage, bucket = gcs
    uri = f"gs://{bucket}/out.mp4"
    storage.write_bytes(uri, b"first", overwrite=False)
    with pytest.raises(OutputExists) as e:
        storage.check_output(uri, overwrite=False)
    assert e.value.status == 409
    with pytest.raises(OutputExists):  # the precondition itself, not only the pre-flight
        storage.write_bytes(uri, b"second", overwrite=False)
    assert gcs_client.bucket(bucket).blob("out.mp4").download_as_bytes() == b"first"
    storage.check_output(uri, overwrite=True)
    storage.write_bytes(uri, b"second", overwrite=True)
    assert storage.read_bytes(uri) == b"second"


def test_gcs_bucket_outside_allow_list_is_403(gcs, make_bucket, gcs_client):
    storage, _ = gcs
    other = make_bucket("other")
    gcs_client.bucket(other).blob("x.mp4").upload_from_string(b"secret")
    for call in (lambda: storage.read_bytes(f"gs://{other}/x.mp4"),
                 lambda: storage.write_bytes(f"gs://{other}/y.mp4", b"z", overwrite=True),
                 lambda: storage.check_output(f"gs://{other}/y.mp4", overwrite=False)):
        with pytest.raises(BucketNotAllowed) as e:
            call()
        assert e.value.status == 403 and other in e.value.message
    assert [b.name for b in gcs_client.list_blobs(other)] == ["x.mp4"]


def test_gcs_empty_allow_list_refuses_every_bucket(tmp_path, make_bucket, gcs_settings_factory):
    bucket = make_bucket("none")
    storage = Storage(gcs_settings_factory(tmp_path, []))
    with pytest.raises(BucketNotAllowed):
        storage.read_bytes(f"gs://{bucket}/a.mp4")


def test_gcs_size_limit_checked_before_download(gcs, gcs_client):
    storage, bucket = gcs
    gcs_client.bucket(bucket).blob("big.mp4").upload_from_string(b"x" * 5000)
    urls = []
    storage.gcs._http.hooks["response"].append(lambda r, *a, **k: urls.append(r.request.url))
    with pytest.raises(InputTooLarge) as e:
        storage.read_bytes(f"gs://{bucket}/big.mp4", max_bytes=4999)
    assert e.value.status == 413 and "5000" in e.value.message
    assert not any("alt=media" in u for u in urls), "the body was downloaded before the size check"


def test_gcs_failed_upload_leaves_no_object(gcs, gcs_client):
    storage, bucket = gcs
    size = 2 * UPLOAD_CHUNK_BYTES + 1024
    stream = FailingStream(size, fail_after=UPLOAD_CHUNK_BYTES + 1)  # breaks in the 2nd chunk
    with pytest.raises(StorageUnavailable, match="broke mid-upload"):
        storage.write_stream(f"gs://{bucket}/partial.mp4", stream, size=size, overwrite=False)
    assert stream.tell() > 0  # the upload really had started
    assert list(gcs_client.list_blobs(bucket)) == []
    with pytest.raises(SourceNotFound):
        storage.read_bytes(f"gs://{bucket}/partial.mp4")


def test_gcs_outage_is_502_with_cause(tmp_path, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    storage = Storage(Settings(storage_root=tmp_path, allowed_buckets=["*"], storage_timeout_s=0.5))
    with pytest.raises(StorageUnavailable) as e:
        storage.read_bytes("gs://some-bucket/a.mp4")
    assert e.value.status == 502 and "Connection refused" in e.value.message
    with pytest.raises(StorageUnavailable):
        storage.write_bytes("gs://some-bucket/b.mp4", b"abc", overwrite=False)


@pytest.mark.parametrize("uri", ["", "   ", "gs://", "gs://bucket", "gs://bucket/", "gs:///obj",
                                 "gs://Bad_Bucket!/o", "http://example.com/a.mp4", "s3://b/o"])
def test_malformed_uri_is_400(tmp_path, uri):
    storage = Storage(Settings(storage_root=tmp_path, allowed_buckets=["*"]))
    with pytest.raises(InvalidURI) as e:
        storage.read_bytes(uri)
    assert e.value.status == 400


# ------------------------------------------------------------------ local


def test_local_round_trip_and_409(tmp_path):
    storage = Storage(Settings(storage_root=tmp_path))
    assert storage.write_bytes("out/a.mp4", b"hello", overwrite=False) == "out/a.mp4"
    assert (tmp_path / "out" / "a.mp4").read_bytes() == b"hello"
    assert storage.read_bytes("out/a.mp4") == b"hello"
    assert storage.read_bytes(f"file://{tmp_path}/out/a.mp4") == b"hello"
    assert storage.read_bytes(str(tmp_path / "out" / "a.mp4")) == b"hello"  # absolute, inside root
    with pytest.raises(OutputExists):
        storage.check_output("out/a.mp4", overwrite=False)
    with pytest.raises(OutputExists):
        storage.write_bytes("out/a.mp4", b"other", overwrite=False)
    storage.write_bytes("out/a.mp4", b"other", overwrite=True)
    assert storage.read_bytes("out/a.mp4") == b"other"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4"]  # no temp files


def test_local_missing_is_404_and_too_large_is_413(tmp_path):
    storage = Storage(Settings(storage_root=tmp_path))
    with pytest.raises(SourceNotFound):
        storage.read_bytes("nope.mp4")
    (tmp_path / "big.bin").write_bytes(b"x" * 100)
    with pytest.raises(InputTooLarge):
        storage.read_bytes("big.bin", max_bytes=99)
    assert len(storage.read_bytes("big.bin", max_bytes=100)) == 100


def test_local_path_escape_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    (root / "link.txt").symlink_to(outside)
    (root / "linkdir").symlink_to(tmp_path)
    storage = Storage(Settings(storage_root=root))
    for uri in ["../secret.txt", "a/../../secret.txt", str(outside), f"file://{outside}",
                "link.txt", "linkdir/secret.txt", "/etc/passwd"]:
        with pytest.raises(PathEscape) as e:
            storage.read_bytes(uri)
        assert e.value.status == 403, uri
        # the message never says where a path resolves to, nor where the root is
        assert str(tmp_path) not in e.value.message.replace(uri, ""), e.value.message
    with pytest.raises(PathEscape):
        storage.write_bytes("linkdir/new.mp4", b"x", overwrite=True)
    with pytest.raises(PathEscape):
        storage.write_bytes("../new.mp4", b"x", overwrite=True)
    assert not (tmp_path / "new.mp4").exists()
    assert outside.read_bytes() == b"secret"


def test_local_failed_write_leaves_nothing(tmp_path):
    storage = Storage(Settings(storage_root=tmp_path))
    stream = FailingStream(3 * 1024 * 1024, fail_after=1024 * 1024 + 1)
    with pytest.raises(StorageUnavailable, match="broke mid-upload"):
        storage.write_stream("out/b.mp4", stream, size=3 * 1024 * 1024, overwrite=False)
    assert list((tmp_path / "out").iterdir()) == []
    # a failed overwrite keeps the old file whole
    (tmp_path / "out" / "c.mp4").write_bytes(b"old")
    with pytest.raises(StorageUnavailable):
        storage.write_stream("out/c.mp4", FailingStream(3 << 20, 1 << 20), size=3 << 20, overwrite=True)
    assert (tmp_path / "out" / "c.mp4").read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.mp4"]


def test_gcs_server_errors_are_502_with_the_status(tmp_path, monkeypatch):
    # a real HTTP server that answers every call with 503, standing in for a GCS outage
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Down(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"error": {"code": 503, "message": "backend unavailable"}}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")
        storage = Storage(Settings(storage_root=tmp_path, allowed_buckets=["*"], storage_timeout_s=0.5))
        with pytest.raises(StorageUnavailable) as e:
            storage.read_bytes("gs://some-bucket/a.mp4")
        assert e.value.status == 502 and "503" in e.value.message
    finally:
        server.shutdown()
        server.server_close()
