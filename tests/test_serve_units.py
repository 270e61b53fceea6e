"""Ingress pieces that need no running Ray: error mapping, the admission gate, timeouts."""
from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter

import pytest

from deployments import errors, ingress
from deployments.admission import AdmissionGate
from deployments.availability import STALE_AFTER_S, StageAvailability, StageReplicas, can_host, stage_replicas
from lipserve.contract import EXAMPLE_REQUEST
from lipserve.errors import NoFaceFound, Overloaded, StageUnavailable, Timeout
from lipserve.pipeline import gather_or_cancel, with_timeout


def test_errors_from_replicas_and_serve_map_to_named_errors():
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    cause = NoFaceFound("no face in the first frames")
    wrapped = RayTaskError("sync", "traceback text", cause).as_instanceof_cause()
    mapped = errors.named_error(wrapped)
    assert isinstance(mapped, NoFaceFound) and mapped.status == 422 and mapped.message == cause.message
    assert isinstance(errors.named_error(BackPressureError(num_queued_requests=3, max_queued_requests=2)),
                      Overloaded)
    assert errors.named_error(ValueError("bug")) is None


def test_error_response_bodies_and_headers():
    r = errors.error_response(Overloaded("busy"), "rid-1")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert b'"code":"overloaded"' in r.body and b'"request_id":"rid-1"' in r.body
    r = errors.error_response(KeyError("boom"), "rid-2")
    assert r.status_code == 500 and b'"code":"internal"' in r.body and b"boom" not in r.body


def test_admission_gate_refuses_beyond_active_plus_waiting():
    async def scenario():
        gate = AdmissionGate(active=1, waiting=1)
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


def test_a_reserved_place_is_held_until_used_or_given_back():
    """Jobs reserve their place when accepted: the gate counts it at once; a place given back
    (cancelled before or while waiting, or handed a slot it never took) frees it for the next."""
    async def scenario():
        gate = AdmissionGate(active=1, waiting=1)
        running = gate.reserve()            # takes the slot at once
        queued = gate.reserve()             # takes the one waiting place
        with pytest.raises(Overloaded):
            gate.reserve()
        queued.close()                      # a job cancelled before its work began
        again = gate.reserve()              # its place is free again
        waiter = asyncio.create_task(again.__aenter__())
        await asyncio.sleep(0.01)
        assert not waiter.done()            # waits for the slot
        waiter.cancel()                     # cancelled while waiting (e.g. its timeout)
        await asyncio.gather(waiter, return_exceptions=True)
        assert gate.waiting == 0 and gate.running == 1
        handed = gate.reserve()
        running.close()                     # the slot is handed to `handed` ...
        assert gate.running == 1 and gate.waiting == 0
        handed.close()                      # ... which gives it back without ever using it
        assert gate.running == 0
        async with gate.slot():
            assert gate.running == 1
        return gate.running

    assert asyncio.run(scenario()) == 0


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
    """A stand-in lipserve.runtime.Stage."""

    def __init__(self, settings, device="cpu"):
        import torch

        self.settings, self.device, self.synthetic_weights = settings, torch.device(device), True
        self.warm_up_report = None

    def preload(self):
        pass

    def warm_up(self, seconds=1.0, inputs=None):
        self.warm_up_report = {"path": 0.0}
        return self.warm_up_report

    def describe(self):
        return {"engine": "stub"}


def test_the_stage_objects_are_stages():
    """What StageReplica relies on, without asking the object: the Stage protocol."""
    from lipserve.lipsync import LipSyncer
    from lipserve.runtime import Stage
    from lipserve.tts import SpeechSynthesizer
    from lipserve.voice import VoiceConverter

    for cls in (SpeechSynthesizer, VoiceConverter, LipSyncer):
        missing = [name for name in ("preload", "warm_up", "describe", "device") if not hasattr(cls, name)]
        assert missing == [], f"{cls.__name__} lacks {missing}"
    assert isinstance(_Worker(None), Stage) and not isinstance(object(), Stage)


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
    assert len(builds) == 2 and replica.settings.lipsync.face_mode == "track"
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


class _WarmableWorker(_Worker):
    def __init__(self, settings):
        super().__init__(settings)
        self.warm_up_report, self.warm_ups = None, []

    def warm_up(self, seconds=1.0, inputs=None):
        self.warm_ups.append(seconds)
        self.warm_up_report = {"path": 0.0}
        return self.warm_up_report


def _warmable_stage(builds: list):
    from deployments.common import StageReplica

    class Stage(StageReplica):
        stage = "test"
        stage_module = "json"  # what load() imports before build()

        def build(self, settings):
            builds.append(settings)
            return _WarmableWorker(settings)

    return Stage


def test_a_replica_warms_up_before_it_counts_as_started_and_preload_warms_one_that_did_not(monkeypatch):
    from deployments import common
    from lipserve.settings import Settings

    monkeypatch.setattr(common, "stage_metrics", lambda: None)  # Ray metrics need a Ray worker
    builds: list = []
    Stage = _warmable_stage(builds)
    monkeypatch.setenv("LIPSERVE_WARMUP_SECONDS", "0.7")
    replica = Stage()
    assert replica.worker.warm_ups == [0.7]
    assert set(replica.start_seconds) == {"import", "build", "warm_up"}
    desc = replica.describe_stage()
    assert desc["warmed_up"] is True and desc["start_seconds"] == replica.start_seconds
    asyncio.run(replica.warm())  # already warm: /api/v1/preload-models does not warm again
    assert replica.worker.warm_ups == [0.7]

    monkeypatch.setenv("LIPSERVE_WARMUP", "0")
    cold = Stage()
    assert cold.worker.warm_ups == [] and "warm_up" not in cold.start_seconds
    assert cold.describe_stage()["warmed_up"] is False
    asyncio.run(cold.warm())  # the explicit trigger warms a replica that started without it, once
    asyncio.run(cold.warm())
    assert cold.worker.warm_ups == [0.7] and cold.describe_stage()["warmed_up"] is True
    assert Settings(warmup=False).runtime.warmup is False


def test_a_user_config_that_changes_settings_does_not_load_the_models_twice(monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    from deployments import common

    user_config = {"log_level": "INFO", "settings": {"face_mode": "track"}}
    context = SimpleNamespace(_deployment_config=SimpleNamespace(user_config=user_config), replica_tag="r1")
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    monkeypatch.setattr(common, "stage_metrics", lambda: None)
    monkeypatch.setenv("LIPSERVE_WARMUP", "0")
    builds: list = []
    replica = _warmable_stage(builds)()
    assert [s.lipsync.face_mode for s in builds] == ["track"]  # built once, with the user_config's settings
    replica.reconfigure(user_config)  # what Serve calls right after the constructor
    assert len(builds) == 1
    assert replica.describe_stage()["replica_id"] == "r1"


def test_openapi_schema_is_the_contract_models():
    """/openapi.json (what /docs renders) shows the models of lipserve/contract.py as they are,
    every error status with its codes, the example, and never FastAPI's own 422 shape."""
    from lipserve.contract import ErrorBody, JobStatus, LipVideoRequest, LipVideoResponse, error_codes

    spec = ingress.app.openapi()
    schemas = spec["components"]["schemas"]
    ref = "#/components/schemas/{model}"
    for model, mode in ((LipVideoRequest, "validation"), (LipVideoResponse, "serialization"),
                        (ErrorBody, "serialization"), (JobStatus, "serialization")):
        ours = model.model_json_schema(ref_template=ref, mode=mode)["properties"]
        published = schemas[model.__name__]["properties"]
        if mode == "serialization":  # FastAPI shows some defaults of what it answers, and not others
            ours = {name: {k: v for k, v in field.items() if k != "default"} for name, field in ours.items()}
            published = {name: {k: v for k, v in field.items() if k != "default"} for name, field in published.items()}
        assert published == ours, model.__name__
        published = schemas[model.__name__]
        assert set(published.get("required", [])) == set(model.model_json_schema(mode=mode).get("required", []))
    request = schemas["LipVideoRequest"]
    assert request["additionalProperties"] is False and request["examples"] == [EXAMPLE_REQUEST]
    assert schemas["RequestOptions"]["properties"]["resize_factor"]["anyOf"][0] == {"type": "integer", "minimum": 1,
                                                                                   "maximum": 8}
    assert all(field.get("description") for field in request["properties"].values())
    assert "HTTPValidationError" not in json.dumps(spec)  # validation failures are our 400, never FastAPI's 422
    for path in ("/api/v1/lip-video", "/api/v1/lip-video-optimized", "/api/v1/jobs"):
        op = spec["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"] == ref.format(model="LipVideoRequest")
        assert body["examples"]["gcs"]["value"] == EXAMPLE_REQUEST
        success, model = ("202", "JobStatus") if path == "/api/v1/jobs" else ("200", "LipVideoResponse")
        assert op["responses"][success]["content"]["application/json"]["schema"]["$ref"] == ref.format(model=model)
        for status in (400, 401, 403, 404, 409, 413, 422, 500, 502, 503, 504):
            answer = op["responses"][str(status)]
            assert answer["content"]["application/json"]["schema"]["$ref"] == ref.format(model="ErrorBody")
            assert all(code in answer["description"] for code in error_codes(status)), (path, status)
        assert "Retry-After" in op["responses"]["503"]["headers"]
    # the streamed answer: the same body, the video itself on 200, the same JSON errors before it
    stream = spec["paths"]["/api/v1/lip-video/stream"]["post"]
    assert stream["requestBody"]["content"]["application/json"]["schema"]["$ref"] == ref.format(model="LipVideoRequest")
    assert "video/mp4" in stream["responses"]["200"]["content"]
    for status in (400, 401, 403, 404, 409, 413, 422, 503):
        schema = stream["responses"][str(status)]["content"]["application/json"]["schema"]
        assert schema["$ref"] == ref.format(model="ErrorBody")
    assert {"/api/v1/jobs/{job_id}", "/api/v1/uploads", "/api/v1/media", "/api/v1/languages", "/health",
            "/api/v1/models", "/api/v1/preload-models"} == set(spec["paths"]) - {
                "/api/v1/lip-video", "/api/v1/lip-video-optimized", "/api/v1/lip-video/stream", "/api/v1/jobs"}


def test_a_deployments_user_config_may_set_only_the_settings_it_reads():
    """`max_text_chars` is read by the ingress's limits: under LipSyncer it would change nothing,
    so it is refused with where it belongs; LipSyncer's own and the model runtime's keys pass."""
    from deployments.common import replica_settings
    from deployments.lipsync import LipSyncDeployment
    from deployments.speech import SpeechDeployment
    from deployments.voice import VoiceDeployment

    owns = LipSyncDeployment.func_or_class.owns
    settings = replica_settings({"face_mode": "static", "device": "cpu"}, owns, "LipSyncer")
    assert settings.lipsync.face_mode == "static" and settings.runtime.device == "cpu"
    with pytest.raises(ValueError, match=r"LipSyncer: .*max_text_chars \(read by the limits section\)"):
        replica_settings({"max_text_chars": 10}, owns, "LipSyncer")
    with pytest.raises(ValueError, match="face_mode"):
        replica_settings({"face_mode": "track"}, VoiceDeployment.func_or_class.owns, "VoiceConverter")
    with pytest.raises(ValueError, match="freevc_variant"):
        replica_settings({"freevc_variant": "freevc-s"}, SpeechDeployment.func_or_class.owns, "SpeechSynthesizer")


def test_the_readme_names_the_settings_sections_each_deployment_reads():
    from pathlib import Path

    from deployments.lipsync import LipSyncDeployment
    from deployments.speech import SpeechDeployment
    from deployments.voice import VoiceDeployment

    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    for name, owns in [("SpeechSynthesizer", SpeechDeployment.func_or_class.owns),
                       ("VoiceConverter", VoiceDeployment.func_or_class.owns),
                       ("LipSyncer", LipSyncDeployment.func_or_class.owns),
                       ("Ingress", ingress.INGRESS_SECTIONS)]:
        assert f"{name}: {', '.join(owns)}" in readme


def test_a_stage_without_a_running_replica_is_refused_at_once_but_a_silent_controller_refuses_nothing():
    """The ingress's view of the controller: LipSyncer without a running replica, as the controller
    says when asked after the request came, is a 503 naming it; no answer yet, a failing or an old
    answer refuses nothing; the poll's answer alone never refuses (the replica may be back)."""
    now = [100.0]
    answers = [{"SpeechSynthesizer": 1, "VoiceConverter": 1, "LipSyncer": 0}]
    asked = []

    def ask(app_name):
        assert app_name == "lipserve"
        asked.append(now[0])
        answer = answers[0]
        if isinstance(answer, Exception):
            raise answer
        return {name: StageReplicas(serving) for name, serving in answer.items()}

    seen = StageAvailability("lipserve", ("SpeechSynthesizer", "VoiceConverter", "LipSyncer"), ask=ask,
                             clock=lambda: now[0])

    async def scenario():
        await seen.check()  # never answered: nothing is known, nothing refused, nothing asked
        assert asked == []
        await seen.refresh()
        assert seen.missing() == ["LipSyncer"]
        with pytest.raises(StageUnavailable) as refused:
            await seen.check()  # asked again (even an answer just in may predate a replica), still none
        assert refused.value.stage == "LipSyncer" and refused.value.status == 503 and refused.value.retry_after > 0
        assert len(asked) == 2
        now[0] += 0.5
        answers[0] = {"SpeechSynthesizer": 1, "VoiceConverter": 1, "LipSyncer": 1}
        assert seen.missing() == ["LipSyncer"]  # the poll's view still says none...
        await seen.check()  # ...but the ask for this request finds the replica back
        assert len(asked) == 3 and seen.missing() == []
        answers[0] = {"SpeechSynthesizer": 1, "VoiceConverter": 1, "LipSyncer": 0}
        await seen.refresh()
        now[0] += 1
        answers[0] = RuntimeError("controller restarting")
        await seen.check()  # the recheck failed: no answer from after the request, so no refusal
        assert len(asked) == 5 and seen.missing() == ["LipSyncer"]  # the poll's view stays until stale
        now[0] += STALE_AFTER_S + 1
        assert seen.missing() == [] and await seen.check() is None

    asyncio.run(scenario())


def test_a_refusal_is_not_taken_from_an_ask_that_began_before_the_request():
    """An ask in flight (the poll's) may hold the controller's snapshot from before the replacement
    replica ran; a refusal that shares it asks once more, and the newer answer wins."""
    now = [100.0]
    release = threading.Event()
    asked = []

    def ask(app_name):
        lipsync = 0 if not asked else 1  # the first ask's snapshot predates the new replica
        asked.append(now[0])
        if len(asked) == 2:  # the poll's slow ask
            release.wait(5)
        return {"SpeechSynthesizer": StageReplicas(1), "VoiceConverter": StageReplicas(1),
                "LipSyncer": StageReplicas(lipsync if len(asked) != 2 else 0)}

    seen = StageAvailability("lipserve", ("SpeechSynthesizer", "VoiceConverter", "LipSyncer"), ask=ask,
                             clock=lambda: now[0])

    async def scenario():
        await seen.refresh()
        assert seen.missing() == ["LipSyncer"]
        now[0] += 1
        polling = asyncio.create_task(seen._ask_once())  # begins at 101 and hangs
        await asyncio.sleep(0.05)
        now[0] += 1  # the request comes at 102, while that ask is still out
        checking = asyncio.create_task(seen.check())
        await asyncio.sleep(0.05)
        release.set()
        await polling
        await checking  # the 101 answer (none running) was not enough: the 102 ask says one runs
        assert asked == [100.0, 101.0, 102.0] and seen.missing() == []

    asyncio.run(scenario())


def test_a_job_book_that_does_not_answer_is_a_503_naming_it_not_a_hang(monkeypatch):
    from deployments import jobs

    monkeypatch.setattr(jobs, "BOOK_TIMEOUT_S", 0.05)

    async def never():
        await asyncio.Event().wait()

    with pytest.raises(StageUnavailable) as refused:
        asyncio.run(jobs.JobRunner.ask_book("get", never()))
    assert refused.value.stage == "JobStore" and refused.value.status == 503

    async def answer():
        return {"status": "done"}

    assert asyncio.run(jobs.JobRunner.ask_book("get", answer())) == {"status": "done"}


def test_a_replica_on_a_draining_node_still_counts_and_a_replacement_is_coming_only_where_a_node_can_host_it(monkeypatch):
    """Serve routes calls to RUNNING and PENDING_MIGRATION replicas (a replica it keeps on a draining
    node until its replacement runs): both count, a STARTING or STOPPING one does not. A stage with
    none serving and one STARTING has its replacement coming only when a live node, not draining,
    has in total what its ray_actor_options ask for."""
    from types import SimpleNamespace

    from ray.serve import context

    def deployment(states, **actor_options):
        return {"replicas": [{"state": state} for state in states],
                "deployment_config": {"ray_actor_options": actor_options}}

    details = {"applications": {"lipserve": {"deployments": {
        "LipSyncer": deployment(["PENDING_MIGRATION", "STARTING"], num_cpus=0, num_gpus=1),
        "VoiceConverter": deployment(["RUNNING"]),
        "SpeechSynthesizer": deployment(["STARTING", "STOPPING"], num_cpus=1, resources={"lipsync_node": 1}),
    }}}}
    monkeypatch.setattr(context, "_get_global_client",
                        lambda raise_if_no_controller_running: SimpleNamespace(get_serve_details=lambda: details))
    head = {"NodeID": "head", "Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}}
    worker = {"NodeID": "w1", "Alive": True, "Resources": {"GPU": 1.0, "lipsync_node": 1.0, "CPU": 1.0}}
    asked_nodes = []

    def nodes(*rows, draining=()):
        def ask():
            asked_nodes.append(1)
            return list(rows), set(draining)
        return ask

    assert stage_replicas("lipserve", nodes(head, worker)) == {
        "LipSyncer": StageReplicas(1), "VoiceConverter": StageReplicas(1),
        "SpeechSynthesizer": StageReplicas(0, replacement_coming=True)}
    assert len(asked_nodes) == 1  # only for the stage with none serving and one starting
    assert stage_replicas("lipserve", nodes(head))["SpeechSynthesizer"] == StageReplicas(0)  # lost node
    assert stage_replicas("lipserve", nodes(head, {**worker, "Alive": False}))["SpeechSynthesizer"] == StageReplicas(0)
    assert stage_replicas("lipserve", nodes(head, worker, draining={"w1"}))["SpeechSynthesizer"] == StageReplicas(0)
    assert stage_replicas("another-app", nodes(head)) == {}
    assert can_host({"num_cpus": 0, "num_gpus": 0.5}, [head], set())
    assert not can_host({"num_cpus": 4}, [head], set())
    assert not can_host({"memory": 1}, [head], set())  # asks for memory the node does not report


def test_a_request_waits_for_a_replacement_that_is_coming_and_is_refused_when_it_does_not_come(monkeypatch):
    """LipSyncer has none serving and its replacement starts on a node that can host it: a request
    waits and goes on once it runs; when it does not run within the wait it is a 503 naming the
    stage; a stage no node can host is refused at once; a job (wait 0) is let through."""
    from deployments import availability

    monkeypatch.setattr(availability, "HOLD_POLL_S", 0.01)
    now = [100.0]
    script = []  # the LipSyncer answers, in order; the last repeats

    def ask(app_name):
        now[0] += 1.0  # each ask takes a second of the clock
        lipsync = script.pop(0) if len(script) > 1 else script[0]
        return {"SpeechSynthesizer": StageReplicas(1), "VoiceConverter": StageReplicas(1), "LipSyncer": lipsync}

    seen = StageAvailability("lipserve", ("SpeechSynthesizer", "VoiceConverter", "LipSyncer"), ask=ask,
                             clock=lambda: now[0])
    coming, running, lost = StageReplicas(0, True), StageReplicas(1), StageReplicas(0)

    async def refusal(answer: StageReplicas, wait_s: float) -> tuple[StageUnavailable, float]:
        """The refusal a request gets while LipSyncer's answer is `answer`, and the clock it took."""
        script[:] = [answer]
        await seen.refresh()
        started = now[0]
        with pytest.raises(StageUnavailable) as refused:
            await seen.check(wait_s=wait_s)
        assert refused.value.stage == "LipSyncer"
        return refused.value, now[0] - started

    async def scenario():
        script[:] = [coming, coming, coming, coming, running]
        await seen.refresh()
        await seen.check(wait_s=30)  # waited while it started, through once it runs
        assert seen.missing() == [] and script == [running]
        refused, took = await refusal(coming, wait_s=5)
        assert "replacement_wait_s" in str(refused) and 5 <= took <= 8
        await seen.check(wait_s=0)  # a job: let through to Serve's queue
        refused, took = await refusal(lost, wait_s=30)
        assert "no live node" in str(refused) and took <= 2  # at once: the one ask for this request
        await refusal(lost, wait_s=0)

    asyncio.run(scenario())
