"""The deployment graph: one ingress over three stages.

    serve run pipeline_graph:app                    # defaults in the deployment decorators
    serve deploy serve_config.yaml                  # GPU cluster (import_path pipeline_graph:app)
    serve run serve_config.local.yaml               # CPU box, no GPUs

`build_app()` binds the same graph with the deployment options of a serve config file (and
overrides, and env vars for the replicas), for tests and `make demo`, which run it with
`serve.run` on a local Ray.
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

app = Ingress.bind(SpeechDeployment.bind(), VoiceDeployment.bind(), LipSyncDeployment.bind())


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


def build_app(config: str | Path | dict | None = None, *, overrides: dict[str, dict] | None = None,
              env: dict[str, str] | None = None, app_name: str | None = None):
    """The graph with each deployment's options from `config` (a serve config; None = decorator
    defaults), deep-merged with `overrides[name]`, and `env` (plus the config's runtime_env
    env_vars) set on every replica through ray_actor_options.runtime_env.

    `serve.run(build_app(...))` then behaves like `serve deploy <config>` for these options.
    """
    options, runtime_env = deployment_options(config, app_name) if config is not None else ({}, {})
    env_vars = {**(runtime_env.get("env_vars") or {}), **(env or {})}
    bound = {}
    for name, cls in DEPLOYMENTS.items():
        opts = _merge(options.get(name, {}), (overrides or {}).get(name, {}))
        if env_vars:
            actor = dict(opts.get("ray_actor_options") or cls.ray_actor_options or {})
            renv = dict(actor.get("runtime_env") or {})
            renv["env_vars"] = {**(renv.get("env_vars") or {}), **{k: str(v) for k, v in env_vars.items()}}
            actor["runtime_env"] = renv
            opts["ray_actor_options"] = actor
        bound[name] = cls.options(**opts) if opts else cls
    return bound["Ingress"].bind(bound["SpeechSynthesizer"].bind(), bound["VoiceConverter"].bind(),
                                 bound["LipSyncer"].bind())


def app_builder(args: dict):
    """`serve run pipeline_graph:app_builder config=serve_config.local.yaml`."""
    return build_app(args.get("config"))
