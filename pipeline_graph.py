"""The deployment graph: one ingress over three stages.

    serve deploy serve_config.yaml                  # GPU cluster (import_path pipeline_graph:app)
    serve run serve_config.local.yaml               # CPU box, no GPUs
    serve run pipeline_graph:app                    # serve_config.yaml's options, one replica each

Every deployment's resources and limits are written once, in the serve configs; the decorators
carry none. `app` takes serve_config.yaml's, but for the replica count (what `serve build
pipeline_graph:app` writes out).
`build_app()` binds the same graph with the deployment options of a serve config file (and
overrides, and env vars for the replicas), for tests, benchmarks and `make demo`, which run it
with `serve.run` on a local Ray (devtools/local_graph.py).
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from deployments.ingress import Ingress
from deployments.lipsync import LipSyncDeployment
from deployments.speech import SpeechDeployment
from deployments.voice import VoiceDeployment

ROOT = Path(__file__).resolve().parent
GPU_CONFIG = ROOT / "serve_config.yaml"
LOCAL_CONFIG = ROOT / "serve_config.local.yaml"

DEPLOYMENTS = {"Ingress": Ingress, "SpeechSynthesizer": SpeechDeployment,
               "VoiceConverter": VoiceDeployment, "LipSyncer": LipSyncDeployment}


def load_config(config: str | Path | dict) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    return yaml.safe_load(Path(config).read_text())


def deployment_options(config: str | Path | dict, app_name: str | None = None) -> tuple[dict[str, dict], dict]:
    """(name -> options for .options(), the application's runtime_env) from a serve config."""
    cfg = load_config(config)
    apps = cfg.get("applications") or []
    chosen = next((a for a in apps if app_name in (None, a.get("name"))), None)
    if chosen is None:
        raise ValueError(f"no application {app_name!r} in the serve config")
    options = {}
    for entry in chosen.get("deployments") or []:
        entry = dict(entry)
        name = entry.pop("name")
        if name not in DEPLOYMENTS:
            raise ValueError(f"serve config names unknown deployment {name!r}; known: {sorted(DEPLOYMENTS)}")
        options[name] = entry
    return options, dict(chosen.get("runtime_env") or {})


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def with_app_runtime_env(options: dict, runtime_env: dict) -> dict:
    """The deployment's options with the application's runtime_env under its own, as Serve applies
    an application's runtime_env: the deployment's keys win, env_vars are merged."""
    if not runtime_env:
        return options
    actor = dict(options.get("ray_actor_options") or {})
    own = dict(actor.get("runtime_env") or {})
    env_vars = {**(runtime_env.get("env_vars") or {}), **(own.get("env_vars") or {})}
    actor["runtime_env"] = {**runtime_env, **own, "env_vars": {k: str(v) for k, v in env_vars.items()}}
    return {**options, "ray_actor_options": actor}


def bind_graph(options: dict[str, dict]):
    """The graph, each deployment with its options applied by Serve's own `.options()`."""
    bound = {name: cls.options(**options.get(name, {})) for name, cls in DEPLOYMENTS.items()}
    return bound["Ingress"].bind(bound["SpeechSynthesizer"].bind(), bound["VoiceConverter"].bind(),
                                 bound["LipSyncer"].bind())


def build_app(config: str | Path | dict = LOCAL_CONFIG, *, overrides: dict[str, dict] | None = None,
              env: dict[str, str] | None = None, app_name: str | None = None):
    """The graph with each deployment's options from `config` (a serve config), deep-merged with
    `overrides[name]`, and the config's runtime_env (its env_vars plus `env`) on every replica.

    `serve.run(build_app(...))` then behaves like `serve deploy <config>` for these options.
    """
    options, runtime_env = deployment_options(config, app_name)
    runtime_env = {**runtime_env, "env_vars": {**(runtime_env.get("env_vars") or {}), **(env or {})}}
    return bind_graph({name: with_app_runtime_env(_merge(options.get(name, {}), (overrides or {}).get(name, {})),
                                                  runtime_env)
                       for name in DEPLOYMENTS})


def app_builder(args: dict):
    """`serve run pipeline_graph:app_builder config=serve_config.local.yaml`."""
    return build_app(args.get("config") or LOCAL_CONFIG)


# how many replicas each config says itself: Serve lays a config's num_replicas over the code's
# options without clearing an autoscaling_config they carry, so the code carries neither
REPLICA_COUNT_KEYS = ("num_replicas", "autoscaling_config")
app = bind_graph({name: {k: v for k, v in options.items() if k not in REPLICA_COUNT_KEYS}
                  for name, options in deployment_options(GPU_CONFIG)[0].items()})
