"""Real servers for the integration and system tiers: `multimed serve` in a subprocess (its own
local Ray, the ten encoders, the router, the gateway) on loopback ports, stopped by pid with
SIGINT as an operator's Ctrl-C would, and killed with its whole session if it hangs."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from multimed.client import MultiMedClient
from multimed.models.catalog import CATALOG
from multimed.services.config import encoder_deployment
from multimed.services.server import wait_serving

TOKEN = "integration-secret"
MAX_MESSAGE_MB = 4
START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str
    metrics_url: str
    bundle: Path
    cohort: Path
    process: subprocess.Popen
    token: str = TOKEN
    max_message_mb: float = MAX_MESSAGE_MB
    log: Path | None = None  # what `multimed serve` printed and logged

    def client(self) -> MultiMedClient:
        return MultiMedClient(self.url, token=self.token)

    @property
    def patients(self) -> list[Path]:
        """The synthetic cohort's patient folders, in order."""
        return sorted(p for p in self.cohort.iterdir() if p.is_dir())


def serve_config(
    path: Path,
    bundle: Path,
    encoders: dict | None = None,
    hospital: dict | None = None,
    in_router: dict | None = None,
    transport: str | None = None,
    deployed: set[str] | None = None,
) -> Path:
    """deploy/serve_config.yaml for tests: X-ray at two replicas; `encoders`: backends;
    `hospital`: args such as pacs and fhir; `in_router`: encoders placed in the router;
    `transport`: the router's to the encoders; `deployed`: the only modalities with a deployment
    of their own, every other torch encoder placed in the router (a server for what a test
    exercises starts in a fraction of the time: each deployment is a process to start)."""
    config = yaml.safe_load(Path("deploy/serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"]["bundle"] = str(bundle)
    if encoders:
        app["args"]["encoders"] = encoders
    if deployed is not None:
        placed = set(CATALOG.modalities) - set(deployed) - set(encoders or {})
        in_router = {**{m: {} for m in sorted(placed)}, **(in_router or {})}
        absent = {encoder_deployment(m) for m in in_router}
        app["deployments"] = [d for d in app["deployments"] if d["name"] not in absent]
    if in_router:
        app["args"]["in_router"] = in_router
    if transport:
        app["args"]["encoder_transport"] = transport
    app["args"].update(hospital or {})
    for d in app["deployments"]:
        if d["name"] == "encoder-xray":
            d["num_replicas"] = 2
            d["user_config"] = {"max_batch_size": 8, "torch_threads": 1}
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    try:
        wait_serving(url, START_TIMEOUT_S, alive=lambda: process.poll() is None)
    except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f"{e}; its log:\n{log.read_text()[-3000:]}") from None


def token_file(work: Path, tokens: dict[str, str]) -> Path:
    """A token file (one 'NAME TOKEN' a line), readable by its owner only."""
    path = work / "tokens"
    path.write_text("".join(f"{name} {token}\n" for name, token in tokens.items()))
    path.chmod(0o600)
    return path


@contextmanager
def running_server(
    work: Path,
    config: Path,
    token: str = TOKEN,
    extra: tuple[str, ...] = (),
    wait=None,
    env: dict[str, str] | None = None,
    stop_s: float = 90,
):
    """`multimed serve` with `config` in a subprocess on free loopback ports, the token from a
    token file, until the block ends; `extra`: more `serve` arguments; `wait(url, process, log)`
    instead of a plaintext health check; `env`: its environment (default: this one's); `stop_s`:
    how long Ctrl-C may take before its whole session is killed. -> (grpc url, metrics url,
    process)."""
    port, metrics_port = free_port(), free_port()
    log = work / "serve.log"
    tokens = token_file(work, {"integration": token})
    command = [
        sys.executable,
        "-m",
        "multimed.cli",
        "-v",
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--token-file",
        str(tokens),
        "--max-message-mb",
        str(MAX_MESSAGE_MB),
        "--dashboard-port",  # off unless `extra` asks (the session's server does)
        "0",
        *extra,
    ]
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
        )
    url = f"127.0.0.1:{port}"
    try:
        (wait or _wait_serving)(url, process, log)
        yield url, f"http://127.0.0.1:{metrics_port}/metrics", process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the server and its Ray
            process.wait()


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every process in session `sid` (a server started with
    start_new_session: the CLI, its Ray and every replica)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            # Fields after the command's closing parenthesis: state ppid pgrp session ...
            session = int(stat.rsplit(")", 1)[1].split()[3])
            if session == sid:
                out[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return out


_REPLICA_TITLE = re.compile(r"ServeReplica:multimed:([\w-]+)")


def replicas(sid: int) -> dict[str, list[int]]:
    """Deployment name -> pids of its replica processes in session `sid` (a server's, or a Ray
    node's): an embedded Ray is local-only, so another process cannot join it as a driver."""
    out: dict[str, list[int]] = {}
    for pid, cmd in sorted(session_processes(sid).items()):
        # Ray retitles an actor's process while a method runs ("ray::ServeReplica:multimed:
        # encoder-xray.check_health()"), so the name ends at the first character that is not one.
        if found := _REPLICA_TITLE.search(cmd):
            out.setdefault(found[1], []).append(pid)
    return out


def health(url: str, service: str = "") -> int | None:
    """grpc.health.v1's status for `service` on a plaintext port; None when the call fails."""
    with grpc.insecure_channel(url) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
        except grpc.RpcError:
            return None


def rss_bytes(pids) -> int:
    """Resident memory of these processes together (those that exited count 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def scrape(server) -> str:
    """/metrics, with the token (the server has tokens on, so a scrape needs one)."""
    request = urllib.request.Request(
        server.metrics_url, headers={"Authorization": f"Bearer {server.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class StreamMetadata(grpc.StreamStreamClientInterceptor):
    """Adds metadata to every streaming call (reflection's one method streams)."""

    def __init__(self, metadata):
        self.metadata = metadata

    def intercept_stream_stream(self, continuation, details, requests):
        details = details._replace(metadata=(*(details.metadata or ()), *self.metadata))
        return continuation(details, requests)
