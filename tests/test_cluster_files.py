"""The cluster files agree with the rest of the repository (nothing here needs a cluster)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
sys.path.insert(0, str(CLUSTER))
import render_rayservice  # noqa: E402


def load(path: Path):
    return yaml.safe_load(path.read_text())


def pip_installs(text: str) -> list[list[str]]:
    """Each `pip install ...` command in a shell text, as its argument list after `install`,
    with -q, --index-url X and a leading variable prefix dropped (they do not change *what* is installed)."""
    commands = []
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = code.replace("\\\n", " ")
    for match in re.finditer(r"pip install ([^\n;&|]*)", joined):
        words = shlex.split(match.group(1).replace("${", "{").replace("$", ""))
        args, skip = [], False
        for w in words:
            if skip:
                skip = False
                continue
            if w in ("--index-url", "--extra-index-url"):
                skip = True
                continue
            if w in ("-q", "--quiet", "--upgrade", "-U"):
                continue
            args.append(w)
        commands.append(args)
    return commands


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.single-gpu.yaml", "cluster/rayservice.yaml",
                                  "cluster/rayservice.base.yaml", "cluster/ray-cluster-gcp.yaml"])
def test_yaml_files_parse(path):
    assert isinstance(load(ROOT / path), dict)


def test_rayservice_embeds_exactly_serve_config():
    rayservice = load(CLUSTER / "rayservice.yaml")
    assert rayservice["kind"] == "RayService" and rayservice["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert embedded == load(ROOT / "serve_config.yaml")
    # and the file on disk is what the script renders now (nobody edited it by hand)
    assert (CLUSTER / "rayservice.yaml").read_text() == render_rayservice.render()


def test_render_check_mode_detects_drift(tmp_path):
    stale = tmp_path / "rayservice.yaml"
    stale.write_text("old")
    assert render_rayservice.main(["--check", "--output", str(stale)]) == 1
    stale.write_text(render_rayservice.render())
    assert render_rayservice.main(["--check", "--output", str(stale)]) == 0


def test_rayservice_cluster_fits_the_serve_config():
    rayservice = load(CLUSTER / "rayservice.yaml")
    cluster = rayservice["spec"]["rayClusterConfig"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray"))
    assert ray_pin.endswith("==" + cluster["rayVersion"])
    gpus_per_replica = [d.get("ray_actor_options", {}).get("num_gpus", 0)
                        for app in load(ROOT / "serve_config.yaml")["applications"] for d in app["deployments"]]
    assert max(gpus_per_replica) > 0
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] >= max(gpus_per_replica)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_launcher_config_has_gpu_workers():
    config = load(CLUSTER / "ray-cluster-gcp.yaml")
    assert config["provider"]["type"] == "gcp"
    assert config["head_node_type"] in config["available_node_types"]
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["node_config"].get("guestAccelerators") or
                             t["node_config"]["machineType"].startswith(("g2-", "a2-", "a3-")) for t in gpu_types)
    rayservice_image = load(CLUSTER / "rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert config["docker"]["image"] == rayservice_image  # the same image, one placeholder to replace


def test_image_installs_what_the_makefile_installs():
    makefile = (ROOT / "Makefile").read_text()
    install = (CLUSTER / "install.sh").read_text()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert subprocess.run(["bash", "-n", str(CLUSTER / "install.sh")]).returncode == 0
    assert "cluster/install.sh deps" in dockerfile and "cluster/install.sh project" in dockerfile
    make_cmds = pip_installs(makefile)
    script_cmds = pip_installs(install)
    assert ["pip"] in make_cmds and ["pip"] in script_cmds  # pip itself upgraded first
    assert ["-r", "requirements/cpu-torch.txt"] in make_cmds
    assert ["-r", "requirements/cpu-torch.txt"] in script_cmds
    # the Makefile's `pip install -e .[dev]` is, in install.sh, the dependencies read from
    # pyproject.toml (tests/test_cluster_image.py checks the list) and then the project alone
    assert any(c[0] == "-e" for c in make_cmds) and len(make_cmds) == 3, make_cmds
    assert ["-r", "listed"] in script_cmds and ["--no-deps", "-e", "."] in script_cmds
    assert len(script_cmds) == 4, script_cmds
    # the Dockerfile names no package itself: every install goes through the script
    assert pip_installs(dockerfile) == []


def test_readme_gpu_instructions_match_the_install_script():
    readme = (ROOT / "README.md").read_text()
    install = (CLUSTER / "install.sh").read_text()
    pin = (ROOT / "requirements" / "cpu-torch.txt").read_text().split()[0]
    if "cluster/install.sh" in readme:
        return  # the README runs the script itself: nothing can drift
    default_index = re.search(r"TORCH_INDEX_URL=\$\{TORCH_INDEX_URL:-([^}]+)\}", install).group(1)
    assert pin in readme, f"README's GPU install should pin {pin}"
    readme_index = re.search(r"--index-url (\S+)", readme).group(1)
    assert readme_index == default_index


def test_weights_dir_agrees_between_image_and_serve_config():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    image_dir = re.search(r"LIPSERVE_WEIGHTS_DIR=(\S+)", dockerfile).group(1)
    for app in load(ROOT / "serve_config.yaml")["applications"]:
        env = app.get("runtime_env", {}).get("env_vars", {})
        if "LIPSERVE_WEIGHTS_DIR" in env:
            assert env["LIPSERVE_WEIGHTS_DIR"] == image_dir
    assert "/opt/lipserve/weights" in dockerfile


def test_build_context_leaves_out_local_checkpoints_and_venv():
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split("\n")
    assert "weights/*" in ignore and "!weights/manifest.toml" in ignore and ".venv" in ignore


def test_cluster_readme_recipe_matches_the_files():
    readme = (CLUSTER / "README.md").read_text()
    base = (CLUSTER / "rayservice.base.yaml").read_text()
    chart = re.search(r"helm install kuberay-operator kuberay/kuberay-operator --version (\S+)", readme).group(1)
    assert f"KubeRay {chart}" in base  # the operator version the RayService was written against
    create = next(line for line in readme.splitlines() if "gcloud container clusters create" in line)
    assert "--zone=" in create and "--region" not in create  # zonal: node counts are totals
    autoscaled = [line for line in readme.splitlines() if "--enable-autoscaling" in line]
    assert len(autoscaled) == 2 and all("--total-min-nodes=" in line and "--min-nodes=" not in
                                        line.replace("--total-min-nodes=", "") for line in autoscaled)
    default_index = re.search(r"TORCH_INDEX_URL=\$\{TORCH_INDEX_URL:-([^}]+)\}", (CLUSTER / "install.sh").read_text()).group(1)
    assert default_index.rsplit("/", 1)[1] in readme  # the CUDA index it explains is the one used
    # the render command the README gives parses with the script's own options
    render = re.search(r"python cluster/render_rayservice.py (--serve-config \S+ --image \S+ --output -)", readme)
    assert render, "README should render with --serve-config, --image and --output -"
    with pytest.raises(SystemExit) as usage:  # argparse refuses unknown options with exit status 2
        render_rayservice.main(["--no-such-option"])
    assert usage.value.code == 2
    args = render.group(1).replace("$IMAGE", "example.com/lipserve:v1").split()
    args[-1] = str(Path("/dev/null"))  # parse the README's options, write nowhere that matters
    assert render_rayservice.main([a if a != "serve_config.single-gpu.yaml" else str(ROOT / a) for a in args]) == 0


def test_the_rayservice_survives_losing_its_head():
    """What tests/test_node_faults.py showed a head loss needs: the GCS tables in an external Redis
    (with the password the bundled Redis uses), a head that hosts no replica, a proxy on every node,
    and workers that wait for a new head longer than Ray's 60 s default."""
    cluster = load(CLUSTER / "rayservice.yaml")["spec"]["rayClusterConfig"]
    fault_tolerance = cluster["gcsFaultToleranceOptions"]
    assert fault_tolerance["redisAddress"].startswith("redis://")
    secret = fault_tolerance["redisPassword"]["valueFrom"]["secretKeyRef"]
    redis = list(yaml.safe_load_all((CLUSTER / "redis.yaml").read_text()))
    service = next(d for d in redis if d["kind"] == "Service")
    host, port = fault_tolerance["redisAddress"].removeprefix("redis://").split(":")
    assert host == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    statefulset = next(d for d in redis if d["kind"] == "StatefulSet")
    redis_env = statefulset["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"secretKeyRef": secret} in [e["valueFrom"] for e in redis_env]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert any(g["minReplicas"] >= 1 and g["rayStartParams"].get("num-gpus") == "0"
               for g in cluster["workerGroupSpecs"]), "no CPU worker is always there for the Ingress"
    for name in ("serve_config.yaml", "serve_config.single-gpu.yaml"):
        assert load(ROOT / name)["proxy_location"] == "EveryNode", name
    for group in cluster["workerGroupSpecs"]:
        env = {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert int(env["RAY_gcs_rpc_server_reconnect_timeout_s"]) > 60, group["groupName"]
