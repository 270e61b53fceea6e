"""A multi-node Ray on one machine, for the node-fault tests: a head (devtools/local_ray.py) and
worker nodes, each its own `ray start --block` process tree with its own temp dir, ports and a
capped object store, so a test can lose one (SIGKILL of the tree), freeze it (SIGSTOP / SIGCONT),
drain it (`ray drain-node`), freeze the head's GCS, or lose the whole head and start it again.

No driver runs in this process: the cluster is reached as an operator reaches a real one, with
the Ray and Serve CLIs (given the cluster's token) and over HTTP. `control(code)` runs a short
Python snippet as a driver in a subprocess for what the CLIs need a dashboard for (serve status).

Lost nodes are noticed in seconds: the head's GCS health-checks every raylet each second and
declares it dead after three misses (Ray's defaults: every 3 s, 5 misses of 10 s each).
With `redis_port`, the GCS keeps its tables in that Redis (GCS fault tolerance), under a fresh
namespace, so a restarted head finds the cluster it had.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .local_ray import (AGENT_PORT_FLAGS, LocalRay, _parent_death_signal, alive, command_line, descendants, pick_ports,
                        publish_listen_port, raylet_identity, stop_process_tree, wait_gone)

# the head's GCS: a raylet silent for 3 checks 1 s apart (each given 1 s) is dead
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                      "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # an extra node's object store (Ray's minimum is 75 MiB)
RAY_BIN = Path(sys.executable).with_name("ray")


def process_states(pids: set[int]) -> dict[int, str]:
    """pid -> its state letter (R, S, T for stopped, ...), for the live ones."""
    states = {}
    for pid in pids:
        try:
            states[pid] = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
    return states


def signal_all(pids: set[int], sig: int) -> int:
    """Send `sig` to each of `pids` that still exists; how many got it."""
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent += 1
        except ProcessLookupError:
            pass
    return sent


class WorkerNode:
    """One extra node: `ray start --address=<head> --block` with its own temp dir and ports."""

    def __init__(self, cluster: "LocalCluster", name: str, *, num_gpus: float = 0, num_cpus: float = 0,
                 resources: dict[str, float] | None = None, object_store_bytes: int = OBJECT_STORE_BYTES,
                 env: dict[str, str] | None = None, start_timeout_s: float = 180):
        self.cluster, self.name = cluster, name
        self.num_gpus, self.num_cpus, self.resources = num_gpus, num_cpus, dict(resources or {})
        self.object_store_bytes, self.extra_env, self.start_timeout_s = object_store_bytes, dict(env or {}), start_timeout_s
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"ls{name}-", dir="/tmp"))
        self.process: subprocess.Popen | None = None
        self.node_id: str | None = None
        self.pids: set[int] = set()  # the node's processes, as of the last look

    def command(self, ports: list[int]) -> list[str]:
        cmd = [str(RAY_BIN), "start", "--address", self.cluster.address, "--block", "--temp-dir", str(self.temp_dir),
               "--num-cpus", f"{self.num_cpus:g}", "--num-gpus", f"{self.num_gpus:g}",
               "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats",
               "--log-style", "record", "--min-worker-port", "0", "--max-worker-port", "0"]
        if self.resources:
            cmd += ["--resources", json.dumps(self.resources)]
        for flag, port in zip(AGENT_PORT_FLAGS, ports):
            cmd += [flag, str(port)]
        return cmd

    def start(self) -> "WorkerNode":
        """Start the node and wait until its raylet runs and `ray start` reports it joined."""
        ports = pick_ports(len(AGENT_PORT_FLAGS))
        log_path = self.temp_dir / "ray-start.log"
        env = {**self.cluster.environment(), **self.extra_env}
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(self.command(ports), stdout=out, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=_parent_death_signal())
        deadline = time.monotonic() + self.start_timeout_s
        published = False
        while True:
            if not published:
                identity = raylet_identity(descendants(self.process.pid))
                if identity is not None:
                    # the raylet waits for this file (see local_ray.py); write it before the agent can
                    publish_listen_port(identity[0], identity[1], ports[0])
                    self.node_id, published = identity[1], True
            if published and "Ray runtime started" in log_path.read_text(errors="replace"):
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"worker node {self.name} did not join within {self.start_timeout_s:g} s:\n{tail}")
            time.sleep(0.1)
        self.pids = self.tree()
        return self

    def tree(self) -> set[int]:
        """The node's processes now: `ray start` and everything below it."""
        if self.process is None:
            return set()
        return {self.process.pid} | descendants(self.process.pid)

    def running(self) -> set[int]:
        """Those of the node's processes (as of the last look) still alive; reaps `ray start` once
        it has exited."""
        if self.process is not None:
            self.process.poll()
        return {pid for pid in self.pids if alive(pid)}

    def kill(self) -> int:
        """Lose the node: SIGKILL every one of its processes at once (a machine gone); how many."""
        self.pids = self.tree()
        for pid in self.pids:  # stop first, so none of them notices the others dying and reacts
            os.kill(pid, signal.SIGSTOP)
        killed = signal_all(self.pids, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
        wait_gone(self.pids, 30)
        self.process = None
        return killed

    def freeze(self) -> int:
        """Make the node unreachable without losing it: SIGSTOP every process; how many."""
        self.pids = self.tree()
        return signal_all(self.pids, signal.SIGSTOP)

    def thaw(self) -> int:
        return signal_all(self.pids, signal.SIGCONT)

    def drain(self, reason: str = "DRAIN_NODE_REASON_PREEMPTION", deadline_s: int = 60) -> subprocess.CompletedProcess:
        """`ray drain-node` of this node (what a spot VM's preemption notice leads to on KubeRay)."""
        return subprocess.run([str(RAY_BIN), "drain-node", "--address", self.cluster.address, "--node-id",
                               self.node_id, "--reason", reason, "--reason-message", f"test drains {self.name}",
                               "--deadline-remaining-seconds", str(deadline_s)],
                              env=self.cluster.environment(), capture_output=True, text=True, timeout=60)

    def stop(self) -> set[int]:
        left: set[int] = set()
        if self.process is not None:
            self.thaw()  # a frozen tree cannot stop
            left = stop_process_tree(self.process, 60)
            self.process = None
        return left


class LocalCluster(LocalRay):
    """`with LocalCluster(num_cpus=2, num_gpus=1) as cluster: node = cluster.add_node("node2", ...)`.

    The head is a LocalRay without a driver here, with fast node health checks (and Redis-backed
    GCS tables when `redis_port` is given)."""

    def __init__(self, num_cpus: float | None = None, num_gpus: float | None = None, *,
                 redis_port: int | None = None, env: dict[str, str] | None = None, **kwargs):
        head_env = dict(FAST_HEALTH_CHECKS)
        self.redis_port = redis_port
        if redis_port is not None:
            head_env["RAY_REDIS_ADDRESS"] = f"127.0.0.1:{redis_port}"
            # a namespace of its own: a restarted head must find this cluster, not an earlier one
            head_env["RAY_external_storage_namespace"] = f"lipserve-{secrets.token_hex(6)}"
        head_env.update(env or {})
        super().__init__(num_cpus, num_gpus, connect=False, env=head_env, **kwargs)
        self.nodes: list[WorkerNode] = []

    def add_node(self, name: str, **kwargs) -> WorkerNode:
        node = WorkerNode(self, name, **kwargs).start()
        self.nodes.append(node)
        return node

    def gcs_pids(self) -> set[int]:
        if self.process is None:
            return set()
        return {pid for pid in descendants(self.process.pid) if Path(command_line(pid)[0]).name == "gcs_server"}

    def kill_head(self) -> int:
        """Lose the head: SIGKILL every process of it at once; how many."""
        pids = {self.process.pid} | descendants(self.process.pid)
        signal_all(pids, signal.SIGSTOP)
        killed = signal_all(pids, signal.SIGKILL)
        self.process.wait()
        wait_gone(pids, 30)
        self.process = None
        return killed

    def restart_head(self) -> None:
        """Start the head again with the command it was started with (same ports, same Redis
        namespace), as a new head pod does; the dead head's address file goes first (a new pod
        has none, and `ray start --head` refuses while it names a cluster still answering)."""
        (self.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        self._launch()

    def control(self, code: str, timeout_s: float = 120) -> str:
        """Run `code` as a short-lived driver of this cluster (`ray` imported, connected); its stdout."""
        prelude = ("import ray, json\n"
                   f"ray.init(address={self.address!r}, log_to_driver=False, configure_logging=False)\n")
        done = subprocess.run([sys.executable, "-c", prelude + code], env=self.environment(), capture_output=True,
                              text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"driver snippet failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done.stdout

    def stop(self, keep_logs: bool = False) -> None:
        for node in reversed(self.nodes):
            node.stop()
        super().stop(keep_logs=keep_logs)
        for node in self.nodes:
            if not keep_logs:
                shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.nodes = []
