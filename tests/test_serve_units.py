"""Ingress pieces that need no running Ray: error mapping, the admission gate, timeouts."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from deployments import ingress
from lipserve.errors import NoFaceFound, Overloaded, Timeout
from lipserve.pipeline import gather_or_cancel, with_timeout


def test_errors_from_replicas_and_serve_map_to_named_errors():
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    cause = NoFaceFound("no face in the first frames")
    wrapped = RayTaskError("sync", "traceback text", cause).as_instanceof_cause()
    mapped = ingress.to_lipserve_error(wrapped)
    assert isinstance(mapped, NoFaceFound) and mapped.status == 422 and mapped.message == cause.message
    assert isinstance(ingress.to_lipserve_error(BackPressureError(num_queued_requests=3, max_queued_requests=2)),
                      Overloaded)
    assert ingress.to_lipserve_error(ValueError("bug")) is None


def test_error_response_bodies_and_headers():
    r = ingress.error_response(Overloaded("busy"), "rid-1")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert b'"code":"overloaded"' in r.body and b'"request_id":"rid-1"' in r.body
    r = ingress.error_response(KeyError("boom"), "rid-2")
    assert r.status_code == 500 and b'"code":"internal"' in r.body and b"boom" not in r.body


def test_admission_gate_refuses_beyond_active_plus_waiting():
    async def scenario():
        gate = ingress.AdmissionGate(active=1, waiting=1)
        release = asyncio.Event()
        outcomes = []

        async def request(i):
            try:
                async with gate.slot():
                    await release.wait()
                    outcomes.append(("ran", i))
            except Overloaded:
                outcomes.append(("refused", i))

        tasks = [asyncio.create_task(request(i)) for i in range(4)]
        await asyncio.sleep(0.05)
        refused_early = [o for o in outcomes if o[0] == "refused"]
        release.set()
        await asyncio.gather(*tasks)
        return refused_early, outcomes

    refused_early, outcomes = asyncio.run(scenario())
    assert len(refused_early) == 2  # one running, one waiting, two refused at once
    assert sorted(o[0] for o in outcomes) == ["ran", "ran", "refused", "refused"]


def test_whole_request_timeout_is_504():
    with pytest.raises(Timeout) as info:
        asyncio.run(with_timeout(asyncio.sleep(5), 0.05))
    assert info.value.status == 504


def test_first_branch_failure_cancels_the_other():
    async def scenario():
        cancelled = asyncio.Event()

        async def slow():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def fails():
            await asyncio.sleep(0.01)
            raise NoFaceFound("none")

        with pytest.raises(NoFaceFound):
            await gather_or_cancel(slow(), fails())
        return cancelled.is_set()

    assert asyncio.run(scenario())


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.local.yaml", "serve_config.single-gpu.yaml"])
def test_serve_configs_are_valid_and_bind(name):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    import pipeline_graph

    path = pipeline_graph.ROOT / name
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == "pipeline_graph:app"
    options, runtime_env = pipeline_graph.deployment_options(path)
    assert set(options) == {"Ingress", "SpeechSynthesizer", "VoiceConverter", "LipSyncer"}
    gpus = {n: o["ray_actor_options"]["num_gpus"] for n, o in options.items()}
    if name == "serve_config.yaml":
        assert gpus == {"Ingress": 0, "SpeechSynthesizer": 0, "VoiceConverter": 0.5, "LipSyncer": 1}
        assert runtime_env["env_vars"]["LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS"] == "0"
        for o in options.values():  # every deployment bounded: overload answers 503, never hangs
            assert o["max_queued_requests"] > 0 and o["autoscaling_config"]["max_replicas"] >= 1
        ingress_cfg = options["Ingress"]
        gate = ingress_cfg["user_config"]["max_active"] + ingress_cfg["user_config"]["max_waiting"]
        assert gate < ingress_cfg["max_ongoing_requests"]  # our JSON 503 comes before Serve's queue
    elif name == "serve_config.single-gpu.yaml":
        assert gpus == {"Ingress": 0, "SpeechSynthesizer": 0, "VoiceConverter": 0.5, "LipSyncer": 0.5}
    else:
        assert set(gpus.values()) == {0}
    ingress_deployment = pipeline_graph.build_app(path, env={"LIPSERVE_X": "1"})._bound_deployment
    actor = ingress_deployment.ray_actor_options
    assert actor["num_gpus"] == gpus["Ingress"]
    # the config's runtime_env and the extra env both reach the replicas
    assert actor["runtime_env"]["env_vars"]["LIPSERVE_X"] == "1"
    assert set(runtime_env["env_vars"]) <= set(actor["runtime_env"]["env_vars"])


class _Worker:
    def __init__(self, settings, device="cpu"):
        import torch

        self.settings, self.device, self.synthetic_weights = settings, torch.device(device), True

    def describe(self):
        return {"engine": "stub"}


def _replica(builds: list):
    """A StageReplica around a stand-in worker (the replica logic is what is tested here)."""
    from deployments.common import StageReplica, replica_settings

    class Stage(StageReplica):
        stage = "test"

        def build(self, settings):
            builds.append(settings)
            return _Worker(settings)

    replica = Stage.__new__(Stage)  # skip __init__: it registers Ray metrics
    replica.settings = replica_settings()
    replica.overrides, replica.in_flight = {}, Counter()
    replica.worker = replica.build(replica.settings)
    return replica


def test_reconfigure_reloads_only_when_settings_change():
    builds = []
    replica = _replica(builds)
    replica.reconfigure({"log_level": "INFO"})
    assert len(builds) == 1  # same settings: models stay loaded
    replica.reconfigure({"settings": {"face_mode": "track"}})
    assert len(builds) == 2 and replica.settings.face_mode == "track"
    replica.reconfigure({"settings": {"face_mode": "track"}})
    assert len(builds) == 2


def test_check_health_fails_without_model_or_lost_cuda():
    from lipserve.errors import ModelNotLoaded

    replica = _replica([])
    replica.check_health()
    desc = replica.describe_stage()
    assert desc["up"] and desc["model_loaded"] and desc["synthetic"] and desc["device"] == "cpu"
    import torch

    if not torch.cuda.is_available():  # a replica configured for CUDA whose device went away
        replica.worker.device = torch.device("cuda")
        with pytest.raises(ModelNotLoaded):
            replica.check_health()
    replica.worker = None
    with pytest.raises(ModelNotLoaded):
        replica.check_health()
