"""Serving benchmark: throughput and latency percentiles of the whole path (gateway -> router ->
encoders) against two baselines measured in the same run: the raw in-process batched forward
pass of the same models, and a plain per-request grpc.aio server (bench/plain_server.py).

    .venv/bin/python bench/serving_bench.py --bundle artifacts/default-bundle

Every load loop is bounded by a request count and a duration; servers bind 127.0.0.1 and are
stopped by pid."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from multimed.client import loadtest
from multimed.client.channel import ChannelSettings
from multimed.models.bundle import load_bundle, save_bundle
from multimed.models.catalog import CATALOG, InputForm
from multimed.models.inputs import RawInput
from multimed.models.modalities.registry import build_pipeline
from multimed.models.tasks import TaskModels
from multimed.services.server import wait_serving

SCENARIOS = {  # name -> (task, modalities)
    "image": ("bone_age_classification", ("xray",)),
    "three-modality": ("disease_classification", ("xray", "ct", "mri")),
}
SHAPES = {"xray": (1, 64, 64), "ct": (16, 64, 64), "mri": (16, 64, 64)}


def sized_bundle(source: str, image_size: int, out: Path) -> str:
    """A bundle like `source` whose imaging encoders read image_size x image_size inputs, with
    freshly initialised weights: throughput does not depend on the weights' values, and this
    puts the per-item compute near the issue's probe (1x128x128)."""
    bundle = load_bundle(source)
    modalities = dict(bundle.config.modalities)
    for m in SHAPES:
        modalities[m] = {**modalities.get(m, {}), "image_size": image_size}
    config = bundle.config.model_copy(update={"modalities": modalities})
    torch.manual_seed(0)
    encoders = {
        m: build_pipeline(m, config).build_encoder().state_dict() for m in CATALOG.modalities
    }
    save_bundle(
        out,
        config,
        encoders,
        bundle.tasks_state(),
        {"training": {"data": f"untrained, for benchmarking at {image_size}px"}},
    )
    return str(out)


def make_inputs(modalities, n: int, seed: int = 0) -> list[dict[str, RawInput]]:
    """Distinct decoded-layout tensors per request, so the embedding cache never hits."""
    rng = np.random.default_rng(seed)
    return [
        {
            m: RawInput(m, InputForm.TENSOR, rng.random(SHAPES[m], dtype=np.float32))
            for m in modalities
        }
        for _ in range(n)
    ]


def raw_baseline(bundle_path: str, task: str, modalities, batch: int, seconds: float) -> dict:
    """In-process: preprocessed tensors -> encoders -> fusion and head. No serving at all."""
    bundle = load_bundle(bundle_path)
    pipelines = {
        m: build_pipeline(m, bundle.config).setup("cpu", bundle.encoder_state(m))
        for m in modalities
    }
    tasks = TaskModels(bundle.config)
    tasks.load_state_dict(bundle.tasks_state())
    tasks.eval()
    items = make_inputs(modalities, batch, seed=1)
    batches = {m: p.collate([p.prepare(i[m]) for i in items]) for m, p in pipelines.items()}

    def forward(n: int) -> None:
        outputs = {
            m: p.forward({k: v[:n] for k, v in batches[m].items()}) for m, p in pipelines.items()
        }
        tasks.predict(task, outputs)

    forward(batch)  # warm up
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        forward(batch)
        done += batch
    throughput = done / (time.perf_counter() - started)
    singles = []
    for _ in range(50):
        t = time.perf_counter()
        forward(1)
        singles.append((time.perf_counter() - t) * 1000)
    return {"throughput": throughput, "single_p50_ms": statistics.median(singles)}


def load(url: str, requests: loadtest.TaskLoad, concurrency: int, seconds: float, n: int) -> dict:
    """`concurrency` callers back to back until n requests or the time runs out, after one
    warm-up request per caller (connections and replicas warm)."""
    plan = loadtest.Plan(
        (requests,),
        loadtest.ClosedLoop(concurrency),
        loadtest.Bounds(seconds, n),
        warmup=loadtest.Bounds(60, concurrency),
        repeat_inputs=True,  # --distinct inputs, cycled
    )
    s = loadtest.run(ChannelSettings(url), loadtest.MULTIMED, plan).overall
    return {
        "concurrency": concurrency,
        "requests": s.ok,
        "errors": s.requests - s.ok,
        "throughput": s.throughput_rps,
        "p50_ms": float("nan") if s.p50_ms is None else s.p50_ms,
        "p99_ms": float("nan") if s.p99_ms is None else s.p99_ms,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str) -> subprocess.Popen:
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_serving(url, 420, alive=lambda: process.poll() is None)
    return process


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_load(url, args, label) -> dict:
    out = {}
    for name, (task, modalities) in SCENARIOS.items():
        requests = loadtest.prepare(
            loadtest.MULTIMED, task, make_inputs(modalities, args.distinct, seed=2)
        )
        for c in args.concurrency:
            point = load(url, requests, c, args.seconds, args.max_requests)
            print(
                f"  {label:12s} {name:15s} c={c:3d} {point['throughput']:7.1f} rps  "
                f"p50 {point['p50_ms']:7.1f} ms  p99 {point['p99_ms']:7.1f} ms  "
                f"errors {point['errors']}",
                flush=True,
            )
            out[f"{name}/c{c}"] = point
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="artifacts/default-bundle")
    parser.add_argument("--config", default="deploy/serve_config.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--distinct", type=int, default=512)
    parser.add_argument("--image-size", type=int, help="re-size the imaging encoders' input")
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.image_size:
        scratch = Path(tempfile.mkdtemp(prefix="multimed-bench-"))
        args.bundle = sized_bundle(args.bundle, args.image_size, scratch / "bundle")
    results: dict = {"machine": f"{os.cpu_count()} CPU cores", "args": vars(args), "raw": {}}

    print("raw in-process batched forward (batch 32):", flush=True)
    for name, (task, modalities) in SCENARIOS.items():
        raw = raw_baseline(args.bundle, task, modalities, 32, args.seconds)
        results["raw"][name] = raw
        print(
            f"  {name:15s} {raw['throughput']:7.1f} items/s  single forward p50 "
            f"{raw['single_p50_ms']:.1f} ms",
            flush=True,
        )

    port = free_port()
    url = f"127.0.0.1:{port}"
    print("plain per-request grpc.aio server:", flush=True)
    plain = start(
        [sys.executable, "bench/plain_server.py", "--bundle", args.bundle, "--port", str(port)], url
    )
    try:
        results["plain"] = run_load(url, args, "plain")
    finally:
        stop(plain)

    port = free_port()
    url = f"127.0.0.1:{port}"
    print("MultiMed Serve (gateway -> router -> encoders):", flush=True)
    served = start(
        [
            sys.executable,
            "-m",
            "multimed.cli",
            "serve",
            "--config",
            args.config,
            "--bundle",
            args.bundle,
            "--port",
            str(port),
            "--metrics-port",
            str(free_port()),
        ],
        url,
    )
    try:
        results["served"] = run_load(url, args, "served")
    finally:
        stop(served)

    print("\nratios (served / baseline):")
    for name in SCENARIOS:
        raw = results["raw"][name]
        for c in args.concurrency:
            key = f"{name}/c{c}"
            s, p = results["served"][key], results["plain"][key]
            print(
                f"  {key:22s} vs raw {s['throughput'] / raw['throughput']:.2f}x   "
                f"vs plain {s['throughput'] / p['throughput']:.2f}x   "
                f"p50 - raw single {s['p50_ms'] - raw['single_p50_ms']:+.1f} ms"
            )
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
