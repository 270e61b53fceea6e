"""The synthetic-weight rule, the official checkpoint layouts (read/write/check), where weights are looked for."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lipserve.errors import WeightsMissing
from lipserve.weights.formats import CheckpointFormatError, check_keys, read_checkpoint, write_checkpoint
from lipserve.weights.resolve import load_weights
from lipserve.weights.synthetic import key_uniforms, synthetic_state_dict, synthetic_value


def test_uniforms_are_deterministic_in_range_and_key_dependent():
    a = key_uniforms("layer.weight", 10000)
    assert np.array_equal(a, key_uniforms("layer.weight", 10000))
    assert a.min() >= -1 and a.max() < 1 and abs(a.mean()) < 0.05
    assert not np.array_equal(a[:100], key_uniforms("layer.bias", 100))
    # element i does not depend on how many are drawn
    assert np.array_equal(a[:7], key_uniforms("layer.weight", 7))


def test_rule_branches():
    assert synthetic_value("bn.num_batches_tracked", ()).dtype == np.int64
    assert np.all(synthetic_value("bn.running_mean", (4,)) == 0)
    assert np.all(synthetic_value("bn.running_var", (4,)) == 1)
    g = synthetic_value("conv.weight_g", (8, 1, 1))
    assert np.allclose(g, 1 + 0.1 * key_uniforms("conv.weight_g", 8).reshape(8, 1, 1))
    scale = synthetic_value("norm.weight", (16,))
    assert np.all(np.abs(scale - 1) <= 0.1)
    bias = synthetic_value("conv.bias", (16,))
    assert np.all(np.abs(bias) <= 0.1)
    w = synthetic_value("conv.weight", (32, 3, 3, 3))
    assert w.dtype == np.float32 and np.abs(w).max() <= np.sqrt(3 / 27) + 1e-6


def _rule_by_the_letter(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The rule as the module docstring states it, on whole arrays (the fast fill must equal it bit for bit)."""
    u = key_uniforms(key, int(np.prod(shape)) if shape else 1).reshape(shape)
    if key.endswith("weight_g") or (len(shape) == 1 and key.endswith("weight")):
        return (1.0 + 0.1 * u).astype(np.float32)
    if key.endswith("bias") or len(shape) <= 1:
        return (0.1 * u).astype(np.float32)
    return (u * np.sqrt(3.0 / int(np.prod(shape[1:])))).astype(np.float32)


@pytest.mark.parametrize("key, shape", [("enc.fc2.weight", (1100, 1300)), ("enc.fc2.bias", (70001,)),
                                        ("ln.weight", (1024,)), ("wn.weight_g", (8, 1, 1)), ("conv.weight", (3, 5, 7)),
                                        ("scalar", ())])
def test_fast_fill_is_bit_identical_to_the_rule(key, shape):
    from concurrent.futures import ThreadPoolExecutor

    from lipserve.weights.synthetic import fill_values

    expected = _rule_by_the_letter(key, shape)
    assert np.array_equal(synthetic_value(key, shape).view(np.uint32), expected.view(np.uint32))
    with ThreadPoolExecutor(3) as pool:  # large tensors in parallel slices that cross block boundaries
        out = fill_values(np.empty(shape, np.float32), key, pool)
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))


def test_building_uninitialised_skips_torch_random_init_and_imports_nothing():
    import sys

    from lipserve.models.freevc import SynthesizerTrn
    from lipserve.models.freevc_configs import freevc_config
    from lipserve.weights.resolve import build_uninitialized

    rng, modules = torch.random.get_rng_state(), set(sys.modules)
    net = build_uninitialized(lambda: SynthesizerTrn(freevc_config("freevc")))
    assert torch.equal(torch.random.get_rng_state(), rng)  # no random number drawn for an init
    assert set(sys.modules) == modules  # not the meta device (its first randn imports ~800 modules)
    assert all(p.device.type == "cpu" for p in net.parameters())
    torch.randn(2)  # outside the context, torch is itself again
    assert not torch.equal(torch.random.get_rng_state(), rng)


def test_fill_synthetic_writes_every_tensor_of_a_module_by_the_rule():
    from lipserve.weights.resolve import build_uninitialized
    from lipserve.weights.synthetic import fill_synthetic

    module = fill_synthetic(build_uninitialized(lambda: Tiny(width=300)), threads=2)
    for key, tensor in module.state_dict().items():
        assert np.array_equal(tensor.numpy(), synthetic_value(key, tuple(tensor.shape))), key


def _mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (from /proc/self/maps), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
def test_zip_checkpoints_are_memory_mapped_and_old_pickle_files_still_read(tmp_path):
    state = synthetic_state_dict({k: tuple(v.shape) for k, v in Tiny().state_dict().items()})
    path = write_checkpoint(tmp_path / "s3fd.pth", "s3fd", state)
    mapped = read_checkpoint(path, "s3fd")
    # a mapped tensor's memory is the file's pages, not a private copy
    assert torch.equal(mapped.state_dict["conv.weight"], state["conv.weight"])
    assert _mapped_file(mapped.state_dict["conv.weight"].data_ptr()) == str(path)
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)  # the format of checkpoints from before torch 1.6
    old = read_checkpoint(legacy, "s3fd")
    assert all(torch.equal(old.state_dict[k], state[k]) for k in state)


class Tiny(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, width, 3)
        self.bn = torch.nn.BatchNorm1d(width)


@pytest.mark.parametrize("kind", ["wav2lip", "s3fd", "freevc", "speaker_encoder", "wavlm"])
def test_write_then_read_round_trip(tmp_path, kind):
    state = synthetic_state_dict({k: tuple(v.shape) for k, v in Tiny().state_dict().items()})
    path = write_checkpoint(tmp_path / f"{kind}.pt", kind, state, cfg={"encoder_layers": 1} if kind == "wavlm" else None)
    raw = torch.load(path, weights_only=True)
    if kind == "wav2lip":
        assert set(raw) == {"state_dict", "optimizer", "global_step", "global_epoch"}
        assert all(k.startswith("module.") for k in raw["state_dict"])
    loaded = read_checkpoint(path, kind)
    assert set(loaded.state_dict) == set(state)
    assert all(torch.equal(loaded.state_dict[k], state[k]) for k in state)
    assert not list(tmp_path.glob("*.part"))


def test_read_rejects_wrong_layout_and_garbage(tmp_path):
    bad = tmp_path / "freevc.pth"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(CheckpointFormatError, match="lack"):
        read_checkpoint(bad, "freevc")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="junk.pth"):
        read_checkpoint(junk, "s3fd")


def test_check_keys_names_the_difference():
    expected = {"a.weight": (2, 2), "a.bias": (2,)}
    with pytest.raises(CheckpointFormatError) as exc:
        check_keys({"a.weight": torch.zeros(2, 2), "b.bias": torch.zeros(2)}, expected, where="x.pth")
    msg = str(exc.value)
    assert "a.bias" in msg and "b.bias" in msg and "x.pth" in msg
    with pytest.raises(CheckpointFormatError, match="wrong shape"):
        check_keys({"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(2)}, expected, where="x.pth")


def test_load_weights_missing_file_names_file_and_fetch_command(tmp_path):
    with pytest.raises(WeightsMissing) as exc:
        load_weights(Tiny(), kind="s3fd", filename="s3fd.pth", weights_dir=tmp_path, allow_synthetic=False, what="face detector")
    assert "s3fd.pth" in exc.value.message and "lipserve weights fetch" in exc.value.message


def test_load_weights_synthetic_and_from_file(tmp_path):
    synth_model = Tiny()
    synthetic, _ = load_weights(synth_model, kind="freevc", filename="freevc.pth", weights_dir=tmp_path, allow_synthetic=True, what="t")
    assert synthetic is True
    write_checkpoint(tmp_path / "freevc.pth", "freevc", synth_model.state_dict())
    file_model = Tiny()
    synthetic, ckpt = load_weights(file_model, kind="freevc", filename="freevc.pth", weights_dir=tmp_path, allow_synthetic=False, what="t")
    assert synthetic is False and ckpt.extra["iteration"] == 0
    assert torch.equal(file_model.conv.weight, synth_model.conv.weight)
    write_checkpoint(tmp_path / "freevc.pth", "freevc", Tiny(width=5).state_dict())
    with pytest.raises(CheckpointFormatError, match="wrong shape"):
        load_weights(Tiny(), kind="freevc", filename="freevc.pth", weights_dir=tmp_path, allow_synthetic=False, what="t")


# -- where the weights are looked for ------------------------------------------------------------


def test_default_weights_dir_is_the_checkouts_from_any_folder(tmp_path):
    root = Path(__file__).resolve().parents[1]
    code = "from lipserve.settings import Settings; print(Settings().runtime.weights_dir)"
    env = {k: v for k, v in os.environ.items() if k != "LIPSERVE_WEIGHTS_DIR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert Path(out) == root / "weights" and (Path(out) / "manifest.toml").is_file()


def test_default_weights_dir_outside_a_checkout_is_the_users_data_folder(tmp_path, monkeypatch):
    from lipserve.settings import default_weights_dir

    installed = tmp_path / "site-packages" / "lipserve"  # a wheel install: no weights/manifest.toml beside it
    installed.mkdir(parents=True)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_weights_dir(installed) == tmp_path / "data" / "lipserve" / "weights"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_weights_dir(installed) == Path.home() / ".local/share/lipserve/weights"


def test_missing_weights_error_names_the_folder_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsMissing) as exc:
        load_weights(Tiny(), kind="s3fd", filename="s3fd.pth", weights_dir="relative/w", allow_synthetic=False,
                     what="face detector")
    assert f"weights folder searched: {tmp_path / 'relative' / 'w'};" in exc.value.message
