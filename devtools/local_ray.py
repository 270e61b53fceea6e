"""A private one-node Ray for `make demo` and the tests, that starts on a loaded machine and
stops completely.

Why not plain `ray.init()`: a Ray 2.60 raylet does not register its node until its dashboard
agent (a Python process it starts) has imported Ray and all the dashboard modules, started its
servers and written the ports it bound into files in the session dir. The raylet waits 15 s for
each file (fixed; RAY_agent_register_timeout_ms and RAY_raylet_start_wait_time_s do not change
it), then aborts ("Timed out waiting for file .../dashboard_agent_listen_port_..."), and
`ray.init()` reports "The current node timed out during startup" after its own fixed 30 s. On a
loaded 2-core machine (a test run, another CPU-heavy process, a cold page cache) the agent can
take longer than 15 s.

So here the head is started with `ray start --head --block` with every agent port chosen up
front. The raylet is given three of them on its command line and waits for none of those; the
fourth (the dashboard agent's HTTP port) Ray 2.60 does not pass on, so this process writes the
port it chose into the file the raylet waits for, with Ray's own `persist_port`, as soon as the
raylet is running. The raylet then registers at once and the agents come up beside it; the
raylet gives them `agent_wait_s` (RAY_agent_register_timeout_ms) when it first needs one.

It runs under its own temp dir, so it never touches /tmp/ray/ray_current_cluster (which
`ray.init()` without an address connects to) and never meets another cluster on this machine;
the ports are picked outside the kernel's ephemeral range, so no other process is handed them.
Like a cluster `ray.init()` starts, it requires a token (RAY_AUTH_MODE=token); the token is its
own, in its temp dir, handed to `ray start` and to this driver through RAY_AUTH_TOKEN_PATH.
`stop()` ends the driver, then the `ray start` process, and waits until every process of this
cluster (GCS, raylet, agents, replica workers) has exited.
"""
from __future__ import annotations

import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("lipserve.local_ray")

# agent ports Ray lets us choose; the first is the one whose file this process writes itself
AGENT_PORT_FLAGS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                    "--metrics-export-port")


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # every interface: Ray binds some ports on the node's address
        except OSError:
            return False
    return True


def pick_ports(count: int, low: int = 20000, rng: random.Random | None = None) -> list[int]:
    """`count` distinct free TCP ports between `low` and the start of the ephemeral range.

    Outside the ephemeral range the kernel never hands a port to anyone binding port 0 or
    connecting out, so a port found free here stays free until Ray binds it."""
    rng = rng or random.Random()
    high = ephemeral_range()[0] - 1
    if high - low < count * 10:
        low, high = 1024, high
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randint(low, high)
        if port not in chosen and port_is_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free ports between {low} and {high}")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc; no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields start after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def raylet_identity(pids: set[int]) -> tuple[str, str] | None:
    """(session dir, node id) from the command line of the raylet among `pids`, once it runs."""
    for pid in pids:
        argv = command_line(pid)
        if argv and Path(argv[0]).name == "raylet":
            flags = dict(arg[2:].split("=", 1) for arg in argv[1:] if arg.startswith("--") and "=" in arg)
            if flags.get("session_dir") and flags.get("node_id"):
                return flags["session_dir"], flags["node_id"]
    return None


def publish_listen_port(session_dir: str, node_id: str, port: int) -> None:
    """Write the dashboard agent's HTTP port where the raylet waits for it (what the agent itself
    writes, with the same value, once it has started)."""
    from ray._raylet import DASHBOARD_AGENT_LISTEN_PORT_NAME, persist_port

    persist_port(session_dir, node_id, DASHBOARD_AGENT_LISTEN_PORT_NAME, port)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    """Wait until none of `pids` is alive; return those still alive when time ran out."""
    deadline = time.monotonic() + timeout_s
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {p for p in left if alive(p)}
    return left


def _parent_death_signal():
    """A function for the child to call before exec (Linux): SIGTERM it when the process that
    started it dies, so a killed test run or demo leaves no cluster behind. Bound here, in the
    parent: between fork and exec the child should only make the system call."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process_tree(process: subprocess.Popen, timeout_s: float) -> set[int]:
    """SIGTERM a `ray start --block` (it drains its node, then stops what it started), wait for
    every process below it to exit, SIGKILL what outlives `timeout_s`; those it had to kill."""
    tree = descendants(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    tree |= descendants(process.pid)
    leftovers = wait_gone(tree, timeout_s)
    for pid in leftovers:  # ours, and past their time: make sure they go
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftovers:
        log.warning("local Ray: %d processes outlived the stop and were killed: %s", len(leftovers), sorted(leftovers))
        wait_gone(leftovers, 10)
    return leftovers


class LocalRay:
    """`with LocalRay(num_cpus=2, num_gpus=2) as cluster:` ... `ray.init` is done, `cluster.address`
    is the GCS address, `cluster.metrics_url` Ray's Prometheus export."""

    def __init__(self, num_cpus: int | None = None, num_gpus: int | None = None, *, start_timeout_s: float = 300,
                 agent_wait_s: float = 300, stop_timeout_s: float = 120, connect: bool = True,
                 env: dict[str, str] | None = None):
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        # connect=False: no driver in this process (a multi-node test talks to the cluster through
        # the CLIs and HTTP only, as an operator does); env: RAY_* system settings for the head
        self.connect, self.extra_env = connect, dict(env or {})
        self.ports: list[int] = []
        self.start_timeout_s, self.agent_wait_s, self.stop_timeout_s = start_timeout_s, agent_wait_s, stop_timeout_s
        self.process: subprocess.Popen | None = None
        self.temp_dir: Path | None = None
        self.address: str | None = None
        self.metrics_port: int | None = None
        self.start_s: float | None = None
        self.leftovers: set[int] = set()  # processes that had to be killed at stop (should stay empty)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, ports: list[int]) -> list[str]:
        gcs, client, *agents = ports
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
               "--temp-dir", str(self.temp_dir), "--port", str(gcs), "--ray-client-server-port", str(client),
               "--include-dashboard", "false", "--disable-usage-stats", "--log-style", "record",
               # workers bind whatever port the kernel gives (ray start's default is a fixed range)
               "--min-worker-port", "0", "--max-worker-port", "0"]
        for flag, port in zip(AGENT_PORT_FLAGS, agents):
            cmd += [flag, str(port)]
        if self.num_cpus is not None:
            cmd += ["--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            cmd += ["--num-gpus", str(self.num_gpus)]
        return cmd

    def token_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.temp_dir / "auth_token")}

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
        env.update(self.token_env())
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # how long the raylet keeps trying an agent it needs (the runtime-env agent, before the
        # first replica with env vars starts) before it gives up on the node
        env["RAY_agent_register_timeout_ms"] = str(int(self.agent_wait_s * 1000))
        env.pop("RAY_ADDRESS", None)
        env.update(self.extra_env)
        return env

    def start(self) -> "LocalRay":
        t0 = time.perf_counter()
        # short: Ray's unix sockets live below it and their paths are limited to 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lsray-", dir="/tmp"))
        token_file = self.temp_dir / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        self.ports = pick_ports(2 + len(AGENT_PORT_FLAGS))
        self.metrics_port = self.ports[-1]
        self._launch()
        if self.connect:
            self._connect()
        self.start_s = time.perf_counter() - t0
        log.info("local Ray up at %s in %.1f s (temp dir %s)", self.address, self.start_s, self.temp_dir)
        return self

    def _launch(self) -> None:
        """Start `ray start --head --block` on self.ports and wait until the head is up (also what a
        restart of a lost head runs: the same command, the same ports)."""
        listen_port = self.ports[2]
        log_path = self.temp_dir / "ray-start.log"
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(self.command(self.ports), stdout=out, stderr=subprocess.STDOUT,
                                            env=self.environment(), preexec_fn=_parent_death_signal())
        address_file = self.temp_dir / "ray_current_cluster"  # written by `ray start` once the node is up
        deadline = time.monotonic() + self.start_timeout_s
        published = False
        while not (address_file.is_file() and address_file.read_text().strip()):
            if not published:
                identity = raylet_identity(descendants(self.process.pid))
                if identity is not None:
                    publish_listen_port(*identity, listen_port)
                    published = True
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                logs = self.temp_dir
                self.stop(keep_logs=True)
                raise RuntimeError(f"`ray start` did not come up within {self.start_timeout_s:g} s "
                                   f"(its logs are kept in {logs}):\n{tail}")
            time.sleep(0.05)
        self.address = address_file.read_text().strip()

    def _connect(self) -> None:
        import ray

        self._use_token_here()
        try:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        except Exception:
            self.stop(keep_logs=True)
            raise

    def _use_token_here(self) -> None:
        """This driver presents the cluster's token (ray.init with an address does not pick one)."""
        from ray._raylet import AuthenticationTokenLoader, Config

        self._saved_env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(self.token_env())
        Config.initialize("")  # re-read RAY_AUTH_MODE, as ray.init does when it enables tokens
        AuthenticationTokenLoader.instance().reset_cache()

    def _restore_env(self) -> None:
        for key, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def stop(self, keep_logs: bool = False) -> None:
        """Disconnect, stop the node, and wait for every one of its processes to exit."""
        import ray

        if self.connect and ray.is_initialized():
            ray.shutdown()
        if self.process is not None:
            self.leftovers = stop_process_tree(self.process, self.stop_timeout_s)
            self.process = None
        self._restore_env()
        if self.temp_dir is not None and not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = None

    def __enter__(self) -> "LocalRay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
