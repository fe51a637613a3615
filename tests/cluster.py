"""A multi-node Ray cluster on this host for the system tier: `ray start --head` and workers, each
`ray start --block` in its own session with a loopback address of its own (127.0.0.2, .3, ...:
`ray start` turns 127.0.0.1 into the host's public address), token auth on (the token from a
file), node death noticed within ~2 s. Nodes are stopped by their session, never by process
name, so another Ray on the host (the session's server) is untouched."""

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
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from servers import free_port, replicas, session_processes

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP = "127.0.0.2"
NODE_CPUS = 8  # logical: eleven light replicas share three nodes on a 2-core machine


@dataclass
class Node:
    name: str  # also a custom resource on the node, so a deployment can be pinned to it
    ip: str
    head: bool
    process: subprocess.Popen
    log: Path

    def pids(self) -> dict[int, str]:
        return session_processes(self.process.pid)

    def raylet(self) -> int:
        return next(pid for pid, cmd in self.pids().items() if "/raylet " in cmd.split("--")[0])

    def replicas(self) -> dict[str, list[int]]:
        return replicas(self.process.pid)


@dataclass
class Cluster:
    work: Path
    gcs_port: int
    env: dict[str, str]
    temp_dir: Path  # short: Ray's Unix sockets live under it
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    def start_node(self, name: str, ip: str, head: bool = False) -> Node:
        node = Node(name, ip, head, self._launch(name, ip, head), self.work / f"{name}.log")
        self.nodes.append(node)
        return node

    def restart(self, node: Node) -> None:
        """The same node (name, address; the head on the same GCS port and storage) anew."""
        if node.process.poll() is None:
            self.stop_node(node)
        if node.head:
            # As on a fresh head host: `ray start --head` refuses an address that this file and
            # a live process's --gcs-address (a worker's raylet, here on the same host) name.
            (self.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        node.process = self._launch(node.name, node.ip, node.head)

    def _launch(self, name: str, ip: str, head: bool) -> subprocess.Popen:
        where = ["--head", f"--port={self.gcs_port}"] if head else [f"--address={self.address}"]
        if head:
            where += [f"--ray-client-server-port={free_port()}", "--include-dashboard=false"]
        command = [
            RAY,
            "start",
            "--block",
            *where,
            f"--node-ip-address={ip}",
            f"--num-cpus={NODE_CPUS}",
            f"--resources={json.dumps({name: 1000})}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        with (self.work / f"{name}.log").open("a") as out:
            return subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def wait_nodes(self, n: int, timeout_s: float = 120) -> None:
        """Until n nodes are alive (asked of the GCS with the cluster's token)."""
        deadline = time.monotonic() + timeout_s
        probe = (
            f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
            "print('alive', sum(n['Alive'] for n in ray.nodes()))"
        )
        while time.monotonic() < deadline:
            with suppress(subprocess.TimeoutExpired):  # ray.init waits while no GCS answers
                done = subprocess.run(
                    [sys.executable, "-c", probe],
                    capture_output=True,
                    text=True,
                    env=self.env,
                    timeout=max(5.0, deadline - time.monotonic()),
                )
                alive = [line for line in done.stdout.splitlines() if line.startswith("alive ")]
                if done.returncode == 0 and alive and int(alive[-1].split()[1]) >= n:
                    return
            time.sleep(1)
        logs = "\n".join(n.log.read_text()[-1500:] for n in self.nodes)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout_s:.0f} s; logs:\n{logs}")

    def kill_raylet(self, node: Node) -> None:
        os.kill(node.raylet(), signal.SIGKILL)

    def stop_node(self, node: Node, graceful_s: float = 0) -> None:
        """Every process of the node's session (`ray start`, its raylet, workers, replicas; the
        GCS on the head): SIGTERM to `ray start` first if `graceful_s`, then SIGKILL."""
        if graceful_s and node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=graceful_s)
        for pid in node.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait(timeout=30)


@contextmanager
def ray_cluster(work: Path, workers: int = 2, extra_env: dict[str, str] | None = None):
    """A head node ('node-head') and `workers` ('node-1', ...), until the block ends. -> Cluster,
    whose `env` a driver (multimed serve --ray-address) needs: the token and the node settings."""
    token = work / "ray-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # A killed node is declared dead after ~2 s, not Ray's default 30 s.
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_timeout_ms": "500",
        "RAY_health_check_failure_threshold": "4",
        "RAY_worker_niceness": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        **(extra_env or {}),
    }
    env.pop("RAY_ADDRESS", None)
    cluster = Cluster(work, free_port(), env, Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")))
    try:
        cluster.start_node("node-head", HEAD_IP, head=True)
        cluster.wait_nodes(1)
        for i in range(workers):  # one at a time: nodes starting together race for ports
            cluster.start_node(f"node-{i + 1}", f"127.0.0.{3 + i}")
            cluster.wait_nodes(2 + i)
        yield cluster
    finally:
        # The application is gone by now (its driver deleted it): nothing to drain, and `ray
        # start` stopping its node at leisure took up to 30 s a node.
        for node in reversed(cluster.nodes):
            cluster.stop_node(node, graceful_s=5)
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
