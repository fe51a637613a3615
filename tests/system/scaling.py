"""The autoscaling run's pieces, shared by tests/system/test_autoscaling.py and
bench/autoscale.py: a bundle whose X-ray encoder is the bottleneck on this machine, the serve
config that autoscales it, its replica count as /metrics reports it, and `multimed loadtest`'s
command line for an X-ray load."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import yaml
from load import XRAY_TASK
from servers import metric, scrape, serve_config

from multimed.models.bundle import load_bundle, save_bundle
from multimed.models.catalog import CATALOG
from multimed.services.config import encoder_deployment

# The X-ray encoder reads 384x384 (same weights: it pools to a fixed grid): ~5 ms an input on
# one thread, so one replica, not the gateway (~400 calls/s here), limits an X-ray load.
IMAGE_SIZE = 384
MAX_REPLICAS = 4
# Short delays and windows keep the run to minutes; production keeps Serve's defaults (30 s up,
# 600 s down) or its own.
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": MAX_REPLICAS,
    # Inputs in flight per replica: one batch (servers.serve_config gives X-ray batches of 8).
    "target_ongoing_requests": 8,
    "upscale_delay_s": 3,
    "downscale_delay_s": 15,
    "look_back_period_s": 5,
    "metrics_interval_s": 0.5,
    "policy": {"policy_function": "multimed.services.autoscaling:inputs_policy"},
}


def xray_bound_bundle(source: Path, out: Path) -> Path:
    """`source` with its X-ray encoder reading IMAGE_SIZE pixels a side."""
    bundle = load_bundle(source)
    modalities = dict(bundle.config.modalities)
    modalities["xray"] = {**modalities.get("xray", {}), "image_size": IMAGE_SIZE}
    config = bundle.config.model_copy(update={"modalities": modalities})
    encoders = {m: bundle.encoder_state(m) for m in CATALOG.modalities}
    info = {"training": {"data": f"{bundle.version}, X-ray read at {IMAGE_SIZE}px"}}
    save_bundle(out, config, encoders, bundle.tasks_state(), info)
    return out


def autoscaling_config(path: Path, bundle: Path) -> Path:
    """The system tier's serve config with the X-ray encoder autoscaled from one replica, and
    the embedding cache off, so that repeated inputs reach the encoder every time; the other
    encoders run in the router (only X-ray is loaded)."""
    serve_config(path, bundle, deployed={"xray"})
    config = yaml.safe_load(path.read_text())
    app = config["applications"][0]
    app["args"]["cache_entries"] = 0
    for d in app["deployments"]:
        if d["name"] == encoder_deployment("xray"):
            del d["num_replicas"]
            d["autoscaling_config"] = AUTOSCALING
    path.write_text(yaml.safe_dump(config))
    return path


def xray_replicas(server) -> int:
    """X-ray encoder replicas RUNNING, as the gateway's /metrics says (its watch reads them)."""
    return int(metric(scrape(server), "multimed_encoder_replicas", modality="xray"))


def until_replicas(server, n: int, limit_s: float) -> float | None:
    """Seconds until /metrics shows `n` X-ray replicas (its first figure comes a second after
    the server turns SERVING); None if not within `limit_s`."""
    started = time.monotonic()
    while xray_replicas(server) != n:
        if time.monotonic() - started > limit_s:
            return None
        time.sleep(0.5)
    return time.monotonic() - started


def xray_replicas_that_encoded(server) -> int:
    """How many X-ray replicas answered some input, by multimed_encoder_items_total{replica}."""
    text = scrape(server)
    return sum(
        1
        for line in text.splitlines()
        if line.startswith("multimed_encoder_items_total{")
        and 'modality="xray"' in line
        and float(line.rsplit(" ", 1)[1]) > 0
    )


class ReplicaLog:
    """(seconds since start, X-ray replicas) every `every_s` in a thread, until stopped."""

    def __init__(self, server, every_s: float = 0.5):
        self.server, self.every_s = server, every_s
        self.samples: list[tuple[float, int]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReplicaLog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self.started, xray_replicas(self.server)))
            self._stop.wait(self.every_s)

    def now(self) -> float:
        return time.monotonic() - self.started

    def peak(self) -> int:
        return max((n for _, n in self.samples), default=0)


def loadtest_command(server, token_file: Path, concurrency: int, seconds: float) -> list[str]:
    """`multimed loadtest` as an operator runs it: distinct synthetic X-ray DICOMs, cycled (the
    server's cache is off), `concurrency` callers for `seconds`, a JSON report."""
    return [
        sys.executable,
        "-m",
        "multimed.cli",
        "loadtest",
        "--url",
        server.url,
        "--token-file",
        str(token_file),
        "--task",
        XRAY_TASK,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(seconds),
        "--max-requests",
        "1000000",
        "--distinct",
        "256",
        "--repeat-inputs",
        "--timeout",
        "30",
        "--no-progress",
        "--json",
    ]
