"""One real server for the whole session: `multimed serve` in a subprocess (its own local Ray, the
ten encoders, the router, the gateway), on loopback ports, with X-ray at two replicas. Stopped by
pid with SIGINT, as an operator's Ctrl-C would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from multimed.client import MultiMedClient
from multimed.models.cohort.writer import write_cohort
from multimed.models.config import ModelConfig
from multimed.models.train import TrainSettings, train
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

    def client(self) -> MultiMedClient:
        return MultiMedClient(self.url, token=self.token)

    @property
    def patients(self) -> list[Path]:
        """The synthetic cohort's patient folders, in order."""
        return sorted(p for p in self.cohort.iterdir() if p.is_dir())


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "serving"
    train(out, TrainSettings(patients=60, epochs=1, real_cells=False), ModelConfig())
    return out


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, 3, seed=11)
    return out


def _serve_config(path: Path, bundle: Path, encoders: dict | None = None) -> Path:
    """deploy/serve_config.yaml for tests: X-ray at two replicas; `encoders`: backends."""
    config = yaml.safe_load(Path("deploy/serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"]["bundle"] = str(bundle)
    if encoders:
        app["args"]["encoders"] = encoders
    for d in app["deployments"]:
        if d["name"] == "encoder-xray":
            d["num_replicas"] = 2
            d["user_config"] = {"max_batch_size": 8, "batch_wait_ms": 5, "torch_threads": 1}
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
):
    """`multimed serve` with `config` in a subprocess on free loopback ports, the token from a
    token file, until the block ends; `extra`: more `serve` arguments; `wait(url, process, log)`
    instead of a plaintext health check. -> (grpc url, metrics url, process)."""
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
        *extra,
    ]
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"127.0.0.1:{port}"
    try:
        (wait or _wait_serving)(url, process, log)
        yield url, f"http://127.0.0.1:{metrics_port}/metrics", process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the server and its Ray
            process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory, bundle, cohort) -> Server:
    work = tmp_path_factory.mktemp("server")
    config = _serve_config(work / "serve_config.yaml", bundle)
    with running_server(work, config) as (url, metrics_url, process):
        yield Server(url, metrics_url, bundle, cohort, process)


@pytest.fixture(scope="session")
def remote_server(server, tmp_path_factory):
    """A second server whose X-ray, text and protein encoders run on the first server's
    `encoder_<modality>` models, and whose OCT encoder points at a closed port."""
    work = tmp_path_factory.mktemp("remote")
    tokens = token_file(work, {"integration": TOKEN})
    remote = {"backend": "triton", "url": server.url, "token_file": str(tokens)}
    encoders = {m: remote for m in ("xray", "text", "protein")}  # image, features, tokens
    encoders["oct"] = {"backend": "triton", "url": f"127.0.0.1:{free_port()}", "timeout_s": 2}
    config = _serve_config(work / "serve_config.yaml", server.bundle, encoders)
    with running_server(work, config) as (url, _, _):
        yield url
