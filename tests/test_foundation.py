"""Settings, contract types, errors, timing, and the Ray-free core."""
import subprocess
import sys
from pathlib import Path

import pytest

from lipserve import errors
from lipserve.contract import LipVideoRequest, parse_request
from lipserve.settings import SECTION_OF, Settings
from lipserve.timing import StageTimer

ROOT = Path(__file__).resolve().parents[1]


def test_import_lipserve_does_not_import_ray():
    code = "import lipserve, lipserve.settings, lipserve.contract, lipserve.weights.resolve, sys; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_core_modules_never_import_ray():
    offenders = [p for p in (ROOT / "lipserve").rglob("*.py")
                 if any(line.strip().startswith(("import ray", "from ray")) for line in p.read_text().splitlines())]
    assert offenders == []


def test_settings_defaults_are_safe():
    s = Settings()
    assert s.storage.allowed_buckets == [] and not s.storage.bucket_allowed("any-bucket")
    assert s.runtime.allow_synthetic_weights is False
    assert s.serving.auth_token is None or s.serving.auth_token == ""
    assert 0 < s.limits.max_text_chars <= 5000 and 0 < s.limits.max_input_bytes <= 1 << 30


def test_settings_from_env_and_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "lipserve.yaml"
    cfg.write_text("max_text_chars: 42\nallowed_buckets: [from-yaml]\ndevice: cpu\n")
    monkeypatch.setenv("LIPSERVE_CONFIG", str(cfg))
    monkeypatch.setenv("LIPSERVE_ALLOWED_BUCKETS", "a,b")
    s = Settings()
    assert s.limits.max_text_chars == 42  # from YAML
    assert s.storage.allowed_buckets == ["a", "b"]  # env beats YAML
    assert s.runtime.device == "cpu"
    assert Settings(max_text_chars=7).limits.max_text_chars == 7  # explicit beats both


def test_settings_reject_unknown_and_bad_values(tmp_path, monkeypatch):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("no_such_setting: 1\n")
    monkeypatch.setenv("LIPSERVE_CONFIG", str(cfg))
    with pytest.raises(Exception, match="no_such_setting"):
        Settings()
    monkeypatch.delenv("LIPSERVE_CONFIG")
    monkeypatch.setenv("LIPSERVE_DEVICE", "tpu")
    with pytest.raises(Exception, match="device"):
        Settings()


def test_every_error_has_a_status_and_a_unique_code():
    classes = [c for c in errors.all_error_classes() if c is not errors.LipserveError]
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)), "error codes must be unique"
    for cls in classes:
        assert 400 <= cls.status <= 599
    assert errors.SourceNotFound.status == 404 and errors.OutputExists.status == 409
    assert errors.NoFaceFound.status == 422 and errors.Overloaded.retry_after


def test_error_body_shape():
    body = errors.NoFaceFound("no face in the first frames").to_dict("req-1")
    assert body == {"error": {"code": "no_face_found", "message": "no face in the first frames", "request_id": "req-1"}}


def test_request_defaults_and_validation_names_the_field():
    req = parse_request({"word": "hi", "user_video_gs": "gs://b/in.mp4", "output_video_gs": "gs://b/out.mp4"})
    assert isinstance(req, LipVideoRequest) and req.tts_lang == "en" and req.options.overwrite is False
    with pytest.raises(errors.InvalidField) as exc:
        parse_request({"word": "hi", "user_video_gs": "gs://b/in.mp4"})
    assert exc.value.field == "output_video_gs" and exc.value.status == 400
    with pytest.raises(errors.InvalidField) as exc:
        parse_request({"word": "hi", "user_video_gs": "a", "output_video_gs": "b", "options": {"pads": [0, -1, 0, 0]}})
    assert "pads" in exc.value.field
    with pytest.raises(errors.InvalidField) as exc:
        parse_request({"word": "hi", "user_video_gs": "a", "output_video_gs": "b", "options": {"face_mode": "wobble"}})
    assert "face_mode" in str(exc.value)


def test_stage_timer_table():
    t = StageTimer("TEST")
    t.add("Download Video", 1.0)
    t.add("Wav2Lip", 3.0)
    st = t.finish()
    st["total"] = 4.0
    table = t.table(st)
    assert "Performance Analysis [TEST]" in table
    assert "Wav2Lip:" in table and "75.0%" in table and "Total:" in table


def test_readme_documents_every_setting_and_both_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    missing = [f"LIPSERVE_{name.upper()}" for name in SECTION_OF if f"LIPSERVE_{name.upper()}" not in readme]
    assert missing == []
