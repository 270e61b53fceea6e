"""The page's helpers (lipserve.web) and the contract as the schema publishes it, no Ray."""
from __future__ import annotations

import pytest

from devtools import testmedia
from lipserve import errors, web
from lipserve.contract import EXAMPLE_REQUEST, ErrorBody, error_codes, error_responses, invalid_field, parse_request
from lipserve.settings import Settings
from lipserve.storage import Storage


@pytest.fixture()
def local(tmp_path):
    settings = Settings(storage_root=tmp_path, max_input_bytes=400_000, max_video_seconds=3.0)
    return settings, Storage(settings)


def test_an_upload_is_checked_like_a_source_and_stored_under_a_generated_name(local, tmp_path):
    settings, storage = local
    clip = testmedia.astronaut_clip(seconds=1.0, fps=10, size=(160, 120), audio="tone")
    result = web.store_upload(clip, "../../etc/My Selfie.MOV", settings, storage)
    assert result.uri.startswith("uploads/") and result.uri.endswith(".mov") and "Selfie" not in result.uri
    assert (tmp_path / result.uri).read_bytes() == clip
    assert result.bytes == len(clip) and (result.width, result.height) == (160, 120)
    assert web.store_upload(clip, "notes.txt", settings, storage).uri.endswith(".mp4")


@pytest.mark.parametrize("make, error", [
    (lambda: b"not a video at all" * 100, errors.InvalidMedia),
    (lambda: testmedia.astronaut_clip(seconds=4.0, fps=5, size=(64, 48), audio=None), errors.VideoTooLong),
])
def test_a_refused_upload_leaves_nothing_behind(local, tmp_path, make, error):
    settings, storage = local
    with pytest.raises(error):
        web.store_upload(make(), "x.mp4", settings, storage)
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_playback_reads_only_media_inside_what_the_api_may_read(local, tmp_path):
    settings, storage = local
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.mp4").write_bytes(b"mp4 bytes")
    (tmp_path / "secret.txt").write_text("no")
    assert web.read_media("results/a.mp4", settings, storage) == (b"mp4 bytes", "video/mp4")
    with pytest.raises(errors.InvalidURI):
        web.read_media("secret.txt", settings, storage)
    with pytest.raises(errors.PathEscape):
        web.read_media("/etc/../etc/x.mp4", settings, storage)
    with pytest.raises(errors.PathEscape):
        web.read_media(str(tmp_path.parent / "elsewhere.mp4"), settings, storage)
    with pytest.raises(errors.BucketNotAllowed):
        web.read_media("gs://not-allowed/x.mp4", settings, storage)
    with pytest.raises(errors.SourceNotFound):
        web.read_media("results/missing.mp4", settings, storage)


def test_the_page_is_packaged_and_uses_the_api_routes():
    html = web.page_html()
    for needle in ('id="result"', "api/v1/uploads", "api/v1/jobs", "api/v1/media", "api/v1/languages",
                   "api/v1/lip-video/stream", "api/v1/models"):
        assert needle in html


def test_published_example_and_error_table_match_the_code():
    assert parse_request(EXAMPLE_REQUEST).options.face_mode == "track"
    every = {cls.code for cls in errors.all_error_classes() if cls is not errors.LipserveError}
    listed = set()
    for status, entry in error_responses(400, 401, 403, 404, 409, 413, 422, 500, 502, 503, 504).items():
        assert entry["model"] is ErrorBody
        codes = error_codes(status)
        assert codes and all(code in entry["description"] for code in codes)
        listed |= set(codes)
    assert every == listed, every ^ listed  # no code is missing from the schema
    assert "Retry-After" in error_responses(503)[503]["headers"]


def test_validation_errors_become_invalid_field_as_parse_request_words_them():
    fastapi_style = [{"type": "missing", "loc": ("body", "output_video_gs"), "msg": "Field required"}]
    err = invalid_field(fastapi_style, prefix=("body",))
    assert (err.field, err.message, err.status) == ("output_video_gs", "output_video_gs: Field required", 400)
    for whole_body in ([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error"}],
                       [{"type": "missing", "loc": ("body",), "msg": "Field required"}],
                       [{"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be an object"}]):
        err = invalid_field(whole_body, prefix=("body",))
        assert (err.field, err.message) == ("body", "the body must be a JSON object")
    with pytest.raises(errors.InvalidField) as info:
        parse_request(["not", "an", "object"])
    assert info.value.message == "the body must be a JSON object"
