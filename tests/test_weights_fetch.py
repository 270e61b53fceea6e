"""`lipserve weights fetch` / `verify` against a local HTTP server, with files written in the
official checkpoint formats from synthetic weights."""
from __future__ import annotations

import hashlib
import socket
import tomllib
from pathlib import Path

import pytest
import torch

from lipserve.settings import Settings
from lipserve.weights import cli
from lipserve.weights.fetch import ChecksumMismatch, NoNetwork, SizeMismatch, fetch_entry
from lipserve.weights.formats import write_checkpoint
from lipserve.weights.manifest import load_keyset, load_manifest
from lipserve.weights.synthetic import synthetic_state_dict
from lipserve.weights.verify import stage_plans, verify_all, verify_file

REPO_MANIFEST = Path(__file__).resolve().parents[1] / "weights" / "manifest.toml"


def official_file(tmp_path: Path, kind: str, keyset: str) -> bytes:
    """Bytes of a checkpoint in `kind`'s official layout with the synthetic weights of `keyset`."""
    path = write_checkpoint(tmp_path / f"src-{keyset}.pt", kind, synthetic_state_dict(load_keyset(keyset)))
    return path.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(path: Path, entries: dict[str, dict]) -> Path:
    lines = ["# test manifest\n"]
    for file, e in entries.items():
        lines.append(f'\n[files."{file}"]\n')
        lines.append(f'stage = "{e.get("stage", "voice")}"\nvariants = ["freevc"]\n')
        lines.append(f'kind = "{e["kind"]}"\nkeyset = "{e["keyset"]}"\n')
        lines.append(f'size = {e.get("size", 0)}\nsha256 = "{e.get("sha256", "")}"\n')
        lines.append(f'sha256_prefix = "{e.get("sha256_prefix", "")}"\n')
        urls = ", ".join(f'"{u}"' for u in e["urls"])
        lines.append(f'urls = [{urls}]\nlicense = "test"\n')
    path.write_text("".join(lines))
    return path


def closed_port_url(name: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


@pytest.fixture(scope="module")
def speaker_bytes(tmp_path_factory) -> bytes:
    # the speaker encoder: a real key set (14 tensors, 1.4 M parameters, ~5.7 MB)
    return official_file(tmp_path_factory.mktemp("src"), "speaker_encoder", "speaker_encoder")


def spk_manifest(tmp_path, url, **fields):
    entry = {"kind": "speaker_encoder", "keyset": "speaker_encoder", "urls": [url], **fields}
    return load_manifest(write_manifest(tmp_path / "manifest.toml", {"pretrained_bak_5805000.pt": entry}))


def test_repo_manifest_lists_every_checkpoint_with_known_facts():
    manifest = load_manifest(REPO_MANIFEST)
    assert set(manifest.files()) == {"wav2lip.pth", "wav2lip_gan.pth", "s3fd.pth", "freevc.pth", "freevc-s.pth",
                                     "freevc-24.pth", "WavLM-Large.pt", "pretrained_bak_5805000.pt"}
    assert manifest.get("wav2lip").size == 435_807_851
    assert manifest.get("wav2lip_gan.pth").size == 435_801_865
    assert manifest.get("s3fd").size == 89_843_225
    assert manifest.get("wav2lip_gan").sha256_prefix == "ca9ab7b7"
    for entry in manifest.entries:
        assert entry.urls and all(u.startswith("https://") for u in entry.urls), entry.file
        assert entry.license and entry.expected_shapes(), entry.file
    assert len(manifest.get("WavLM-Large.pt").expected_shapes()) == 488


def test_repo_manifest_records_the_published_hashes_and_sizes():
    manifest = load_manifest(REPO_MANIFEST)
    for entry in manifest.entries:
        # every file's sha256 is published somewhere (manifest.toml says where): none is left to
        # trust on first use
        assert len(entry.sha256) == 64 and entry.hash_source, entry.file
        assert entry.sha256.startswith(entry.sha256_prefix), entry.file
        assert "recorded on first fetch" not in entry.hash_source, entry.file
    published = {"wav2lip.pth": ("b78b681b68ad9fe6c6fb1debc6ff43ad05834a8af8a62ffc4167b7b34ef63c37", 435_807_851),
                 "wav2lip_gan.pth": ("ca9ab7b7b812c0e80a6e70a5977c545a1e8a365a6c49d5e533023c034d7ac3d8", 435_801_865),
                 "s3fd.pth": ("619a31681264d3f7f7fc7a16a42cbbe8b23f31a256f75a366e5a1bcd59b33543", 89_843_225),
                 "freevc-24.pth": ("7b39a86fefbc9ec6e30be8d26ee2a6aa5ffe6d235f6ab15773d01cdf348e5b20", 472_644_351)}
    for file, (digest, size) in published.items():
        assert (manifest.get(file).sha256, manifest.get(file).size) == (digest, size), file
    for file in ("freevc.pth", "freevc-s.pth", "WavLM-Large.pt", "pretrained_bak_5805000.pt"):
        assert manifest.get(file).size is None, f"{file}: no source publishes its size to the byte"
    # S3FD's published name carries its hash prefix (torch.hub's name-HASHPREFIX.ext convention)
    s3fd = manifest.get("s3fd.pth")
    name_prefix = Path(s3fd.urls[0]).stem.rsplit("-", 1)[1]
    assert s3fd.sha256_prefix == name_prefix and s3fd.sha256.startswith(name_prefix)
    # the Nekochu mirror keeps wav2lip.pth at its repository root, like wav2lip_gan.pth
    for file in ("wav2lip.pth", "wav2lip_gan.pth"):
        nekochu = [u for u in manifest.get(file).urls if "/Nekochu/Wav2Lip/" in u]
        assert nekochu == [f"https://huggingface.co/Nekochu/Wav2Lip/resolve/main/{file}"], file


def test_fetch_good_file(tmp_path, file_server, speaker_bytes):
    url = file_server.add("spk.pt", speaker_bytes)
    manifest = spk_manifest(tmp_path, url, size=len(speaker_bytes), sha256=sha(speaker_bytes))
    dest = tmp_path / "w"
    result = fetch_entry(manifest.entries[0], dest, progress=False)
    final = dest / "pretrained_bak_5805000.pt"
    assert result.status == "fetched" and result.sha256 == sha(speaker_bytes)
    assert final.read_bytes() == speaker_bytes
    assert sorted(p.name for p in dest.iterdir()) == ["pretrained_bak_5805000.pt"]  # no .part left
    # a second fetch finds it and does not download again
    n_requests = len(file_server.requests)
    assert fetch_entry(manifest.entries[0], dest, progress=False).status == "present"
    assert len(file_server.requests) == n_requests


def test_fetch_resumes_after_cut_connection(tmp_path, file_server, speaker_bytes):
    cut = 2 * 1024 * 1024 + 5
    url = file_server.add("spk.pt", speaker_bytes, cut_after=cut)
    manifest = spk_manifest(tmp_path, url, size=len(speaker_bytes), sha256=sha(speaker_bytes))
    result = fetch_entry(manifest.entries[0], tmp_path / "w", progress=False)
    assert (tmp_path / "w" / "pretrained_bak_5805000.pt").read_bytes() == speaker_bytes
    assert result.sha256 == sha(speaker_bytes)
    ranges = [r for _, r in file_server.requests]
    assert ranges[0] is None and ranges[1] is not None
    resumed_at = int(ranges[1].split("=")[1].rstrip("-"))
    assert 0 < resumed_at <= cut  # continued from the partial file instead of starting over


def test_fetch_resumes_a_part_file_left_by_an_earlier_run(tmp_path, file_server, speaker_bytes):
    url = file_server.add("spk.pt", speaker_bytes)
    manifest = spk_manifest(tmp_path, url, size=len(speaker_bytes), sha256=sha(speaker_bytes))
    dest = tmp_path / "w"
    dest.mkdir()
    half = len(speaker_bytes) // 2
    (dest / "pretrained_bak_5805000.pt.part").write_bytes(speaker_bytes[:half])
    result = fetch_entry(manifest.entries[0], dest, progress=False)
    assert result.resumed_from == half
    assert file_server.requests == [("/spk.pt", f"bytes={half}-")]
    assert (dest / "pretrained_bak_5805000.pt").read_bytes() == speaker_bytes


def test_fetch_wrong_checksum_leaves_no_file(tmp_path, file_server, speaker_bytes):
    url = file_server.add("spk.pt", speaker_bytes)
    manifest = spk_manifest(tmp_path, url, size=len(speaker_bytes), sha256="0" * 64)
    dest = tmp_path / "w"
    with pytest.raises(ChecksumMismatch) as e:
        fetch_entry(manifest.entries[0], dest, progress=False)
    assert sha(speaker_bytes) in str(e.value) and "0" * 64 in str(e.value)
    assert list(dest.iterdir()) == []  # neither the final name nor a .part


def test_fetch_published_prefix_is_checked(tmp_path, file_server, speaker_bytes):
    url = file_server.add("spk.pt", speaker_bytes)
    wrong_prefix = "ffffffff" if not sha(speaker_bytes).startswith("ffffffff") else "00000000"
    manifest = spk_manifest(tmp_path, url, size=len(speaker_bytes), sha256_prefix=wrong_prefix)
    with pytest.raises(ChecksumMismatch, match="does not start with"):
        fetch_entry(manifest.entries[0], tmp_path / "w", progress=False)
    assert not (tmp_path / "w" / "pretrained_bak_5805000.pt").exists()


def test_fetch_truncated_file_is_a_size_mismatch(tmp_path, file_server, speaker_bytes):
    url = file_server.add("spk.pt", speaker_bytes[:-1000])  # the server only has a truncated copy
    manifest = spk_manifest(tmp_path, url, size=len(speaker_bytes))
    dest = tmp_path / "w"
    with pytest.raises(SizeMismatch) as e:
        fetch_entry(manifest.entries[0], dest, progress=False)
    assert str(len(speaker_bytes)) in str(e.value) and str(len(speaker_bytes) - 1000) in str(e.value)
    assert list(dest.iterdir()) == []


def test_fetch_without_network_fails_fast_with_instructions(tmp_path, capsys):
    manifest = spk_manifest(tmp_path, closed_port_url("spk.pt"), size=123)
    dest = tmp_path / "w"
    with pytest.raises(NoNetwork) as e:
        fetch_entry(manifest.entries[0], dest, progress=False)
    message = str(e.value)
    assert "No network" in message and "Connection refused" in message
    assert str(dest / "pretrained_bak_5805000.pt") in message and "by hand" in message
    assert list(dest.iterdir()) == []
    # the CLI says the same and exits with the no-network status
    rc = cli.main(["weights", "fetch", "pretrained_bak_5805000.pt", "--manifest", str(manifest.path),
                   "--dest", str(dest), "--no-progress"])
    assert rc == cli.EXIT_NO_NETWORK
    assert "No network" in capsys.readouterr().err


def test_cli_fetch_with_url_override_records_sha256(tmp_path, file_server, speaker_bytes, capsys):
    url = file_server.add("mirror/spk.pt", speaker_bytes)
    manifest = spk_manifest(tmp_path, closed_port_url("unused.pt"))  # manifest URL would fail
    dest = tmp_path / "w"
    rc = cli.main(["weights", "fetch", "pretrained_bak_5805000", "--manifest", str(manifest.path),
                   "--dest", str(dest), "--url-override", f"pretrained_bak_5805000.pt={url}",
                   "--record-sha256", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fetched" in out and "sha256 recorded" in out
    table = tomllib.loads(manifest.path.read_text())["files"]["pretrained_bak_5805000.pt"]
    assert table["sha256"] == sha(speaker_bytes) and table["size"] == len(speaker_bytes)
    assert table["hash_source"] == f"recorded on first fetch (trust on first use) from {url}"
    assert manifest.path.read_text().startswith("# test manifest")  # comments survive the edit


def test_cli_fetch_base_url_env(tmp_path, file_server, speaker_bytes, monkeypatch, capsys):
    file_server.add("pretrained_bak_5805000.pt", speaker_bytes)
    manifest = spk_manifest(tmp_path, closed_port_url("unused.pt"), size=len(speaker_bytes))
    monkeypatch.setenv("LIPSERVE_WEIGHTS_BASE_URL", file_server.url("").rstrip("/"))
    rc = cli.main(["weights", "fetch", "pretrained_bak_5805000.pt", "--manifest", str(manifest.path),
                   "--dest", str(tmp_path / "w"), "--no-progress"])
    assert rc == 0, capsys.readouterr()
    assert (tmp_path / "w" / "pretrained_bak_5805000.pt").read_bytes() == speaker_bytes


# ------------------------------------------------------------------ verify


def test_verify_accepts_official_format(tmp_path, speaker_bytes):
    manifest = load_manifest(REPO_MANIFEST)
    (tmp_path / "pretrained_bak_5805000.pt").write_bytes(speaker_bytes)
    check = verify_file(manifest.get("pretrained_bak_5805000.pt"), tmp_path)
    assert check.status == "ok", check.message
    assert "14 tensors" in check.message


def test_verify_accepts_speaker_encoder_extra_similarity_keys(tmp_path):
    # the real file most likely carries the training class's similarity_* tensors; the official
    # loader is non-strict and ignores them, so must we
    state = synthetic_state_dict(load_keyset("speaker_encoder"))
    state["similarity_weight"] = torch.tensor([10.0])
    state["similarity_bias"] = torch.tensor([-5.0])
    write_checkpoint(tmp_path / "pretrained_bak_5805000.pt", "speaker_encoder", state)
    check = verify_file(load_manifest(REPO_MANIFEST).get("pretrained_bak_5805000.pt"), tmp_path)
    assert check.status == "ok", check.message


def test_verify_rejects_wrong_key_set_naming_the_difference(tmp_path):
    manifest = load_manifest(REPO_MANIFEST)
    # an S3FD-layout file (plain state_dict) whose keys are not S3FD's
    shapes = dict(load_keyset("s3fd"))
    shapes.pop("conv1_1.weight")
    tiny = {k: torch.zeros(1) for k in shapes}
    tiny["fc_extra.weight"] = torch.zeros(1)
    write_checkpoint(tmp_path / "s3fd.pth", "s3fd", tiny)
    check = verify_file(manifest.get("s3fd.pth"), tmp_path)
    assert check.status == "invalid"
    assert "conv1_1.weight" in check.message and "missing" in check.message
    assert "fc_extra.weight" in check.message and "unexpected" in check.message
    assert any("differs from the published" in w for w in check.warnings)


def test_verify_rejects_wrong_layout_and_missing_speaker_key(tmp_path, capsys):
    manifest = load_manifest(REPO_MANIFEST)
    # a bare state_dict saved under a Wav2Lip name: the official loader reads ['state_dict']
    torch.save({"audio_encoder.0.conv_block.0.weight": torch.zeros(1)}, tmp_path / "wav2lip_gan.pth")
    state = synthetic_state_dict(load_keyset("speaker_encoder"))
    del state["lstm.weight_hh_l2"]
    write_checkpoint(tmp_path / "pretrained_bak_5805000.pt", "speaker_encoder", state)
    checks = {c.file: c for c in verify_all(manifest, tmp_path)}
    assert checks["wav2lip_gan.pth"].status == "invalid" and "state_dict" in checks["wav2lip_gan.pth"].message
    assert checks["pretrained_bak_5805000.pt"].status == "invalid"
    assert "lstm.weight_hh_l2" in checks["pretrained_bak_5805000.pt"].message
    assert checks["freevc.pth"].status == "missing"
    rc = cli.main(["weights", "verify", "--manifest", str(REPO_MANIFEST), "--dest", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == cli.EXIT_FAILED
    assert "invalid  pretrained_bak_5805000.pt" in out and "lstm.weight_hh_l2" in out


def test_stage_report(tmp_path, speaker_bytes):
    manifest = load_manifest(REPO_MANIFEST)
    (tmp_path / "pretrained_bak_5805000.pt").write_bytes(speaker_bytes)
    checks = verify_all(manifest, tmp_path)
    strict = {p.stage: p for p in stage_plans(Settings(weights_dir=tmp_path), manifest, checks)}
    assert not strict["lipsync"].ready and "wav2lip_gan.pth" in strict["lipsync"].loads
    assert strict["face"].ready and "Haar" in strict["face"].loads
    assert not strict["voice"].ready
    assert "freevc.pth" in strict["voice"].loads and "WavLM-Large.pt" in strict["voice"].loads
    assert "pretrained_bak_5805000.pt" not in strict["voice"].loads.split("missing")[1]  # it is present
    lenient = {p.stage: p for p in stage_plans(Settings(weights_dir=tmp_path, allow_synthetic_weights=True,
                                                        freevc_variant="freevc-s"), manifest, checks)}
    assert lenient["voice"].ready and "SYNTHETIC" in lenient["voice"].loads
    assert "pretrained_bak_5805000.pt" not in lenient["voice"].needs  # freevc-s has its own speaker encoder


def test_main_cli_dispatches_weights_commands(tmp_path, speaker_bytes, capsys):
    from lipserve.cli import main

    (tmp_path / "pretrained_bak_5805000.pt").write_bytes(speaker_bytes)
    rc = main(["weights", "verify", "pretrained_bak_5805000.pt", "--manifest", str(REPO_MANIFEST),
               "--dest", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ok       pretrained_bak_5805000.pt" in out and "What each stage will load" in out
