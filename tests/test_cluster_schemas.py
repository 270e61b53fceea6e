"""Every cluster file against the schema its consumer uses, without a cluster.

* Serve configs (serve_config*.yaml, the rendered RayService's serveConfigV2): Ray's own pydantic
  classes (ray.serve.schema). Those IGNORE unknown keys, so a typo such as `max_replica` would
  deploy silently with the default; these tests walk each YAML mapping against the model's fields
  and refuse any key the model does not define.
* The GCP launcher config: the JSON schema inside the ray wheel (ray/autoscaler/ray-schema.json),
  and Ray's own prepare/validate functions that `ray up` runs.
* The RayService: its structure (what KubeRay and Ray read from it).
"""
from __future__ import annotations

import copy
import json
import sys
import typing
from pathlib import Path

import pydantic
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
sys.path.insert(0, str(CLUSTER))
import render_rayservice  # noqa: E402

SERVE_CONFIGS = ["serve_config.yaml", "serve_config.local.yaml", "serve_config.single-gpu.yaml"]
GPU_STAGES = ("VoiceConverter", "LipSyncer")


def load(path: Path):
    return yaml.safe_load(Path(path).read_text())


# ------------------------------------------------------------------ unknown keys against Ray's models

def _models_in(annotation) -> list[type[pydantic.BaseModel]]:
    """The pydantic model classes an annotation can hold (through Optional, Union, List, Dict...)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _is_list(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):
        return True
    return any(_is_list(a) for a in typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union)


def unknown_keys(model: type[pydantic.BaseModel], data: dict, where: str) -> list[str]:
    """Every key of `data` (recursively) that is not a field of `model` or of the nested models."""
    from ray.runtime_env import RuntimeEnv

    names = {}
    for name, field in model.model_fields.items():
        names[name] = field
        if field.alias:
            names[field.alias] = field
    problems = []
    for key, value in data.items():
        path = f"{where}.{key}"
        field = names.get(key)
        if field is None:
            problems.append(path)
            continue
        if key == "runtime_env" and isinstance(value, dict):
            # free-form for pydantic, but Ray knows its fields: refuse the rest too
            problems += [f"{path}.{k}" for k in value if k not in RuntimeEnv.known_fields]
            continue
        models = _models_in(field.annotation)
        if not models:
            continue
        if isinstance(value, dict):
            problems += unknown_keys(models[0], value, path)
        elif isinstance(value, list) and _is_list(field.annotation):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    problems += unknown_keys(models[0], item, f"{path}[{i}]")
    return problems


def check_serve_config(config: dict, where: str) -> None:
    from ray.runtime_env import RuntimeEnv
    from ray.serve.schema import ServeDeploySchema

    assert unknown_keys(ServeDeploySchema, config, where) == []
    ServeDeploySchema.model_validate(config)  # types and values, as `serve deploy` checks them
    for app in config["applications"]:
        RuntimeEnv(**app.get("runtime_env", {}))  # env_vars must be str -> str (an unquoted 0 fails here)


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_has_only_keys_ray_knows(name):
    check_serve_config(load(ROOT / name), name)


@pytest.mark.parametrize("serve_config", SERVE_CONFIGS[:1] + SERVE_CONFIGS[2:])
def test_rendered_rayservice_serve_config_has_only_keys_ray_knows(serve_config):
    document = yaml.safe_load(render_rayservice.render(serve_config_path=ROOT / serve_config))
    check_serve_config(yaml.safe_load(document["spec"]["serveConfigV2"]), f"rayservice({serve_config})")


def test_the_committed_rayservice_serve_config_has_only_keys_ray_knows():
    document = load(CLUSTER / "rayservice.yaml")
    check_serve_config(yaml.safe_load(document["spec"]["serveConfigV2"]), "cluster/rayservice.yaml")


@pytest.mark.parametrize("where, typo", [
    (("applications", 0, "deployments", 2), {"max_ongoing_request": 2}),
    (("applications", 0, "deployments", 3, "autoscaling_config"), {"max_replica": 3}),
    (("applications", 0, "deployments", 3, "ray_actor_options"), {"num_gpu": 1}),
    (("applications", 0), {"import_pth": "x:y"}),
    (("applications", 0, "runtime_env"), {"env_var": {"A": "1"}}),
    (("http_options",), {"prot": 8000}),
    ((), {"aplications": []}),
])
def test_a_typo_is_caught_although_ray_itself_accepts_it(where, typo):
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(load(ROOT / "serve_config.yaml"))
    node = config
    for step in where:
        node = node[step]
    node.update(typo)
    if not ("aplications" in typo or "env_var" in typo):
        ServeDeploySchema.model_validate(config)  # the reason for this test: Ray says nothing
    problems = unknown_keys(ServeDeploySchema, config, "serve_config.yaml")
    assert len(problems) == 1 and problems[0].endswith("." + next(iter(typo))), problems


def test_an_unquoted_env_var_is_caught():
    config = copy.deepcopy(load(ROOT / "serve_config.yaml"))
    config["applications"][0]["runtime_env"]["env_vars"]["LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS"] = 0
    with pytest.raises(TypeError, match="env_vars"):
        check_serve_config(config, "serve_config.yaml")


# ------------------------------------------------------------------ the single-GPU profile

def _deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for app in config["applications"] for d in app["deployments"]}


def _without_gpu_fractions(config: dict) -> dict:
    config = copy.deepcopy(config)
    for d in _deployments(config).values():
        d.get("ray_actor_options", {}).pop("num_gpus", None)
    return config


def test_single_gpu_profile_differs_from_the_default_only_in_gpu_fractions():
    default, single = load(ROOT / "serve_config.yaml"), load(ROOT / "serve_config.single-gpu.yaml")
    assert _without_gpu_fractions(default) == _without_gpu_fractions(single)
    gpus = {n: d["ray_actor_options"]["num_gpus"] for n, d in _deployments(single).items()}
    assert gpus == {"Ingress": 0, "SpeechSynthesizer": 0, "VoiceConverter": 0.5, "LipSyncer": 0.5}
    # the design's fractions stay in serve_config.yaml
    assert _deployments(default)["LipSyncer"]["ray_actor_options"]["num_gpus"] == 1
    assert _deployments(default)["VoiceConverter"]["ray_actor_options"]["num_gpus"] == 0.5


def gpu_pods_for_min_replicas(config: dict, pod_cpus: float) -> int:
    """GPU worker pods (1 GPU, `pod_cpus` CPUs) that the minimum replicas of the GPU stages need
    (first-fit decreasing, as a bin packer would place them)."""
    items = []
    for name in GPU_STAGES:
        d = _deployments(config)[name]
        count = d.get("autoscaling_config", {}).get("min_replicas", d.get("num_replicas", 1))
        items += [(d["ray_actor_options"]["num_gpus"], d["ray_actor_options"]["num_cpus"])] * count
    pods: list[list[float]] = []
    for gpu, cpu in sorted(items, reverse=True):
        for pod in pods:
            if pod[0] + gpu <= 1 and pod[1] + cpu <= pod_cpus:
                pod[0] += gpu
                pod[1] += cpu
                break
        else:
            pods.append([gpu, cpu])
    return len(pods)


def test_smallest_footprint_is_one_gpu_for_the_profile_and_two_for_the_default():
    gpu_group = next(g for g in load(CLUSTER / "rayservice.base.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                     if g["groupName"] == "gpu")
    pod_cpus = float(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert gpu_pods_for_min_replicas(load(ROOT / "serve_config.single-gpu.yaml"), pod_cpus) == 1
    assert gpu_pods_for_min_replicas(load(ROOT / "serve_config.yaml"), pod_cpus) == 2


# ------------------------------------------------------------------ the RayService

def _groups(document: dict) -> dict[str, dict]:
    cluster = document["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return groups


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return load(CLUSTER / "rayservice.yaml")


def test_rayservice_kind_and_groups(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert rayservice["metadata"]["name"] == "lipserve"
    assert set(_groups(rayservice)) == {"head", "cpu", "gpu"}
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    for name, group in _groups(rayservice).items():
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    assert _groups(rayservice)["gpu"]["minReplicas"] >= 1


def test_requests_equal_limits_and_num_gpus_agrees(rayservice):
    for name, group in _groups(rayservice).items():
        containers = group["template"]["spec"]["containers"]
        assert len(containers) == 1, name
        resources = containers[0]["resources"]
        # Ray sizes the node from the limits: a request below them would let Kubernetes overcommit
        assert resources["requests"] == resources["limits"], name
        gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
        assert group["rayStartParams"]["num-gpus"] == str(gpus), name
        assert set(resources["limits"]) >= {"cpu", "memory"}, name
    gpu = _groups(rayservice)["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]


def test_pods_run_as_the_images_non_root_user(rayservice):
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for name, group in _groups(rayservice).items():
        context = group["template"]["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000, name
    assert "USER 1000" in dockerfile or "USER ray" in dockerfile


def test_object_store_fits_its_shared_memory(rayservice):
    for name, group in _groups(rayservice).items():
        spec = group["template"]["spec"]
        shm = next(v for v in spec["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        limit = shm["emptyDir"]["sizeLimit"]
        assert limit.endswith("Gi")
        assert int(group["rayStartParams"]["object-store-memory"]) <= int(limit[:-2]) * 1024 ** 3, name
        assert {"name": "shm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"], name


def test_render_substitutes_the_image_everywhere():
    image = "us-central1-docker.pkg.dev/my-project/lipserve/lipserve:v1"
    text = render_rayservice.render(image=image)
    assert render_rayservice.IMAGE_PLACEHOLDER not in text
    document = yaml.safe_load(text)
    images = [c["image"] for t in render_rayservice.pod_templates(document) for c in t["spec"]["containers"]]
    assert len(images) == 3 and set(images) == {image}
    # the committed file keeps the placeholder, which the render script replaces
    committed = load(CLUSTER / "rayservice.yaml")
    assert {c["image"] for t in render_rayservice.pod_templates(committed) for c in t["spec"]["containers"]} == \
        {render_rayservice.IMAGE_PLACEHOLDER}
    for bad in ("", render_rayservice.IMAGE_PLACEHOLDER, "a b"):
        with pytest.raises(ValueError):
            render_rayservice.render(image=bad)


def test_render_to_stdout_with_another_serve_config(capsys):
    image = "example.com/lipserve:v2"
    assert render_rayservice.main(["--serve-config", str(ROOT / "serve_config.single-gpu.yaml"),
                                   "--image", image, "--output", "-"]) == 0
    document = yaml.safe_load(capsys.readouterr().out)
    assert yaml.safe_load(document["spec"]["serveConfigV2"]) == load(ROOT / "serve_config.single-gpu.yaml")


# ------------------------------------------------------------------ the GCP launcher config

LAUNCHER = CLUSTER / "ray-cluster-gcp.yaml"


def ray_cluster_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def test_launcher_config_against_rays_json_schema():
    import jsonschema

    jsonschema.validate(load(LAUNCHER), ray_cluster_schema())


def test_launcher_config_passes_rays_own_checks():
    # what `ray up` does before it talks to GCP: fill defaults, then validate
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(LAUNCHER)))


@pytest.mark.parametrize("typo", [{"max_worker": 3}, {"docker": {"imag": "x"}}, {"head_node_typ": "ray_head"}])
def test_the_launcher_schema_refuses_typos(typo):
    import jsonschema

    config = load(LAUNCHER)
    key = next(iter(typo))
    if isinstance(typo[key], dict):
        config[key].update(typo[key])
    else:
        config.update(typo)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_cluster_schema())


def test_launcher_identities_and_registry_login():
    config = load(LAUNCHER)
    types = config["available_node_types"]
    # the head keeps Ray's autoscaler account (it must create worker VMs); workers run as lipserve
    assert "serviceAccounts" not in types[config["head_node_type"]]["node_config"]
    for name, node_type in types.items():
        if name == config["head_node_type"]:
            continue
        emails = [a["email"] for a in node_type["node_config"]["serviceAccounts"]]
        assert emails == ["lipserve@YOUR_GCP_PROJECT.iam.gserviceaccount.com"], name
    # docker on each host logs in to the Artifact Registry of the provider's region before pulling
    registry = f"{config['provider']['region']}-docker.pkg.dev"
    assert f"gcloud auth configure-docker {registry} --quiet" in config["initialization_commands"]
    assert config["provider"]["availability_zone"].startswith(config["provider"]["region"] + "-")


def test_launcher_gpu_nodes_are_valid_gce_instances():
    config = load(LAUNCHER)
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        # Ray hands node_config to instances.insert unchanged; scheduling is an object there
        assert isinstance(node.get("scheduling", {}), dict), name
        if node_type["resources"].get("GPU", 0):
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", name
            assert node.get("guestAccelerators") or node["machineType"].startswith(("g2-", "a2-", "a3-")), name
            assert {"key": "install-nvidia-driver", "value": "True"} in node["metadata"]["items"], name
    assert sum(t.get("max_workers", 0) for n, t in config["available_node_types"].items()
               if n != config["head_node_type"]) <= config["max_workers"]
