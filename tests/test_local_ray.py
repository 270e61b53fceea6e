"""devtools.local_ray without starting Ray: the start command leaves the raylet nothing to wait
for, the ports it picks cannot be handed to anyone else, and stop finds and waits for every process;
and every private Ray hook it leans on is still there in the installed Ray."""
from __future__ import annotations

import importlib
import random
import re
import signal
import subprocess
import sys
import time

from pathlib import Path

from devtools import local_ray
from devtools.local_ray import AGENT_PORT_FLAGS, LocalRay


def test_every_agent_port_is_chosen_up_front(tmp_path):
    """A port left at 0 is one the raylet waits for (the agent writes it to a file once it has
    imported Ray) before it registers the node, and ray.init gives up after 30 s."""
    cluster = LocalRay(num_cpus=2, num_gpus=2)
    cluster.temp_dir = tmp_path
    ports = local_ray.pick_ports(2 + len(AGENT_PORT_FLAGS))
    cmd = cluster.command(ports)
    given = {flag: cmd[cmd.index(flag) + 1] for flag in cmd if flag.startswith("--") and cmd.index(flag) + 1 < len(cmd)}
    for flag in (*AGENT_PORT_FLAGS, "--port", "--ray-client-server-port"):
        assert int(given[flag]) > 0, flag
    assert len({int(given[f]) for f in (*AGENT_PORT_FLAGS, "--port", "--ray-client-server-port")}) == len(ports)
    assert given["--temp-dir"] == str(tmp_path)  # its own ray_current_cluster, never /tmp/ray's
    assert "--block" in cmd and "--head" in cmd
    assert given["--num-cpus"] == "2" and given["--num-gpus"] == "2"
    env = cluster.environment()
    assert env["RAY_agent_register_timeout_ms"] == str(int(cluster.agent_wait_s * 1000))
    # its own token, like a cluster ray.init starts (the driver is given the same path)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "auth_token")


def test_picked_ports_are_free_and_outside_the_ephemeral_range():
    low, _ = local_ray.ephemeral_range()
    ports = local_ray.pick_ports(8, rng=random.Random(7))
    assert len(set(ports)) == 8
    assert all(1024 <= p < low for p in ports)
    assert all(local_ray.port_is_free(p) for p in ports)


def test_stop_helpers_find_the_whole_tree_and_wait_for_it():
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        tree = set()
        while len(tree) < 2 and time.monotonic() < deadline:
            tree = local_ray.descendants(parent.pid)
            time.sleep(0.05)
        assert len(tree) == 2 and all(local_ray.alive(p) for p in tree)
        parent.send_signal(signal.SIGKILL)  # the children are orphaned, as workers are when a raylet dies
        parent.wait()
        assert local_ray.wait_gone(tree, 0.5) == tree  # still running: not gone by themselves
        for pid in tree:
            subprocess.run(["kill", "-9", str(pid)], check=True)
        assert local_ray.wait_gone(tree, 10) == set()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_the_raylet_is_found_and_told_the_listen_port_where_it_waits(tmp_path):
    """The one agent port Ray 2.60 does not hand to the raylet: written where the raylet reads it,
    under Ray's own file name for it."""
    from ray._raylet import DASHBOARD_AGENT_LISTEN_PORT_NAME, get_port_filename

    node_id = "ab" * 28
    fake = subprocess.Popen(["/opt/ray/core/raylet", "-c", "import time; time.sleep(30)",
                             f"--session_dir={tmp_path}", f"--node_id={node_id}", "--node_manager_port=0"],
                            executable=sys.executable)
    try:
        deadline = time.monotonic() + 10
        identity = None
        while identity is None and time.monotonic() < deadline:
            identity = local_ray.raylet_identity({fake.pid})
            time.sleep(0.05)
        assert identity == (str(tmp_path), node_id)
    finally:
        fake.kill()
        fake.wait()
    local_ray.publish_listen_port(str(tmp_path), node_id, 23456)
    assert (tmp_path / get_port_filename(node_id, DASHBOARD_AGENT_LISTEN_PORT_NAME)).read_text().strip() == "23456"
    assert local_ray.raylet_identity({fake.pid}) is None  # gone


# every private piece of Ray that devtools/local_ray.py (and the demo's quiet_ray) uses: module, attribute path
PRIVATE_RAY_HOOKS = [
    ("ray._raylet", "DASHBOARD_AGENT_LISTEN_PORT_NAME"),  # the file the raylet waits for
    ("ray._raylet", "persist_port"),                      # how the agent writes that file
    ("ray._raylet", "get_port_filename"),                 # its name (the test above reads it back)
    ("ray._raylet", "Config.initialize"),                 # re-read RAY_AUTH_MODE in this driver
    ("ray._raylet", "AuthenticationTokenLoader.instance"),
    ("ray._raylet", "AuthenticationTokenLoader.reset_cache"),
    ("ray._private.authentication.authentication_token_setup", None),  # the logger the demo quiets
]


def test_every_private_ray_hook_local_ray_uses_is_still_there():
    """A Ray upgrade that moves or removes one fails here, by name, not as a hung start."""
    missing = []
    for module_name, path in PRIVATE_RAY_HOOKS:
        try:
            target = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        for part in path.split(".") if path else []:
            if not hasattr(target, part):
                missing.append(f"{module_name}.{path}")
                break
            target = getattr(target, part)
    assert not missing, f"private Ray hooks gone in Ray {__import__('ray').__version__}: {missing}"
    # the list is complete: every private module the dev tools import is on it
    listed = {module for module, _ in PRIVATE_RAY_HOOKS}
    tools = Path(local_ray.__file__).parent
    used = {m for f in ("local_ray.py", "demo.py", "local_graph.py")
            for m in re.findall(r"\b(ray(?:\.\w+)*\._\w+(?:\.\w+)*)", (tools / f).read_text())}
    assert used <= listed, f"private Ray modules used but not checked here: {sorted(used - listed)}"


def test_ray_start_still_takes_every_flag_local_ray_gives_it(tmp_path):
    from ray.scripts.scripts import start

    cluster = LocalRay(num_cpus=2, num_gpus=2)
    cluster.temp_dir = tmp_path
    known = {option for param in start.params for option in param.opts}
    given = {arg for arg in cluster.command(list(range(2 + len(AGENT_PORT_FLAGS)))) if arg.startswith("--")}
    assert given <= known, f"`ray start` no longer takes {sorted(given - known)}"
