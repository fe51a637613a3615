"""Serving benchmark: throughput and latency percentiles of the whole path (gateway -> router ->
encoders) against two baselines measured in the same run: the raw in-process batched forward
pass of the same models, and a plain per-request grpc.aio server (bench/plain_server.py).
The served path runs twice: the shipped placement (an encoder deployment per modality) and
`--in-router`'s encoders inside the router replica; both with the embedding cache off.
Per point: CPU per request of the server's whole process tree and of the load generator, and
the share of the server's in Ray's own processes; `--profile`: py-spy summaries of the router
and X-ray replicas at image c=max.

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
import proc
import torch
import yaml

from multimed.client import loadtest
from multimed.client.channel import ChannelSettings
from multimed.models.bundle import load_bundle, save_bundle
from multimed.models.catalog import CATALOG, InputForm
from multimed.models.inputs import RawInput
from multimed.models.modalities.registry import build_pipeline
from multimed.models.tasks import TaskModels
from multimed.services.config import encoder_deployment
from multimed.services.server import wait_serving

SCENARIOS = {  # name -> (task, modalities)
    "image": ("bone_age_classification", ("xray",)),
    "three-modality": ("disease_classification", ("xray", "ct", "mri")),
}
CHANNELS = {"xray": 1, "ct": 16, "mri": 16}  # volumes: slices


def shape(modality: str, size: int) -> tuple[int, int, int]:
    return (CHANNELS[modality], size, size)


def sized_bundle(source: str, image_size: int, out: Path, encoder_size: str | None = None) -> str:
    """A bundle like `source` whose imaging encoders read image_size x image_size inputs (and,
    given `encoder_size`, are that size), with freshly initialised weights: throughput does not
    depend on the weights' values, and this puts the per-item compute near the issue's probe
    (1x128x128)."""
    bundle = load_bundle(source)
    modalities = dict(bundle.config.modalities)
    for m in CHANNELS:
        modalities[m] = {**modalities.get(m, {}), "image_size": image_size}
    update = {"modalities": modalities} | ({"size": encoder_size} if encoder_size else {})
    config = bundle.config.model_copy(update=update)
    torch.manual_seed(0)
    encoders = {
        m: build_pipeline(m, config).build_encoder().state_dict() for m in CATALOG.modalities
    }
    size = f"{encoder_size or config.size} encoders at {image_size}px"
    meta = {"training": {"data": f"untrained, {size}, for benchmarking"}}
    save_bundle(out, config, encoders, bundle.tasks_state(), meta)
    return str(out)


def make_inputs(modalities, n: int, seed: int = 0, size: int = 64) -> list[dict[str, RawInput]]:
    """Distinct decoded-layout tensors per request, so the embedding cache never hits; at the
    encoders' input size, so that what is measured is serving, not resampling (which the raw
    baseline leaves out)."""
    rng = np.random.default_rng(seed)
    return [
        {
            m: RawInput(m, InputForm.TENSOR, rng.random(shape(m, size), dtype=np.float32))
            for m in modalities
        }
        for _ in range(n)
    ]


def raw_baseline(
    bundle_path: str, task: str, modalities, batch: int, seconds: float, size: int
) -> dict:
    """In-process: preprocessed tensors -> encoders -> fusion and head. No serving at all."""
    bundle = load_bundle(bundle_path)
    pipelines = {
        m: build_pipeline(m, bundle.config).setup("cpu", bundle.encoder_state(m))
        for m in modalities
    }
    tasks = TaskModels(bundle.config)
    tasks.load_state_dict(bundle.tasks_state())
    tasks.eval()
    items = make_inputs(modalities, batch, seed=1, size=size)
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


def load(
    url: str,
    requests: loadtest.TaskLoad,
    concurrency: int,
    seconds: float,
    n: int,
    server: int,
    connections: int = 1,
) -> dict:
    """`concurrency` callers back to back until n requests or the time runs out, after one
    warm-up request per caller (connections and replicas warm), dealt over `connections`.
    CPU per request: the server's whole process tree (`server`: its pid) and this process (the
    load generator), each over the run, warm-up requests counted in."""
    plan = loadtest.Plan(
        (requests,),
        loadtest.ClosedLoop(concurrency),
        loadtest.Bounds(seconds, n),
        warmup=loadtest.Bounds(60, concurrency),
        repeat_inputs=True,  # --distinct inputs, cycled
        connections=connections,
    )
    server_cpu, generator_cpu = proc.TreeCpu(server), proc.own_cpu_s()
    s = loadtest.run(ChannelSettings(url), loadtest.MULTIMED, plan).overall
    spent, generator_s = server_cpu.spent(), proc.own_cpu_s() - generator_cpu
    sent = s.requests + concurrency
    return {
        "server_cpu_ms": sum(spent.values()) * 1000 / sent,
        "ray_share": spent["ray"] / max(sum(spent.values()), 1e-9),
        "generator_cpu_ms": generator_s * 1000 / sent,
        "concurrency": concurrency,
        "requests": s.ok,
        "errors": s.requests - s.ok,
        "throughput": s.throughput_rps,
        "p50_ms": float("nan") if s.p50_ms is None else s.p50_ms,
        "p99_ms": float("nan") if s.p99_ms is None else s.p99_ms,
    }


def bench_config(source: str, in_router: list[str], out: Path, routers: int = 1) -> Path:
    """`source` with the embedding cache off (requests cycle through --distinct inputs, and a
    cache hit skips the encoders: with it on, most requests past the first --distinct were
    answered from it), `in_router`'s encoders placed in the router replica and `routers`
    router replicas (sharing the port)."""
    config = yaml.safe_load(Path(source).read_text())
    app = config["applications"][0]
    app["args"]["cache_entries"] = 0
    for deployment in app.get("deployments", []):
        if deployment["name"] == "router":
            deployment["num_replicas"] = routers
    if in_router:
        app["args"]["in_router"] = {m: {"max_batch_size": 32} for m in in_router}
        gone = {encoder_deployment(m) for m in in_router}
        app["deployments"] = [d for d in app.get("deployments", []) if d["name"] not in gone]
    out.write_text(yaml.safe_dump(config))
    return out


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


def run_load(url, args, label, server: subprocess.Popen, profile: Path | None = None) -> dict:
    """Every scenario at every concurrency. `profile`: py-spy the router and the X-ray encoder
    replicas during image c=32 (or the highest c), summaries into the results."""
    out = {}
    for name, (task, modalities) in SCENARIOS.items():
        requests = loadtest.prepare(
            loadtest.MULTIMED,
            task,
            make_inputs(modalities, args.distinct, seed=2, size=args.image_size or 64),
        )
        for c in args.concurrency:
            spies = {}
            if profile is not None and name == "image" and c == max(args.concurrency):
                for deployment in ("router", "encoder-xray"):
                    pid = proc.replica_pid(server.pid, deployment)
                    if pid is not None:
                        spies[deployment] = proc.profile(
                            pid, args.seconds, profile / f"{deployment}.txt"
                        )
            point = load(
                url, requests, c, args.seconds, args.max_requests, server.pid, args.connections
            )
            for deployment, spy in spies.items():
                spy.wait()
                point.setdefault("profile", {})[deployment] = proc.summarise(
                    profile / f"{deployment}.txt"
                )
            print(
                f"  {label:12s} {name:15s} c={c:3d} {point['throughput']:7.1f} rps  "
                f"p50 {point['p50_ms']:7.1f} ms  p99 {point['p99_ms']:7.1f} ms  "
                f"errors {point['errors']}  CPU/req server {point['server_cpu_ms']:.2f} ms"
                + ("" if label == "plain" else f" (Ray's processes {point['ray_share']:.0%})")
                + f", generator {point['generator_cpu_ms']:.2f} ms",
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
    parser.add_argument(
        "--in-router",
        nargs="*",
        default=["xray"],
        help="also measure with these encoders in the router replica (none: skip)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the router and X-ray replicas at image c=max"
    )
    parser.add_argument("--routers", type=int, default=1, help="router replicas (served paths)")
    parser.add_argument(
        "--connections", type=int, default=1, help="client connections the load is dealt over"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.image_size:
        scratch = Path(tempfile.mkdtemp(prefix="multimed-bench-"))
        args.bundle = sized_bundle(args.bundle, args.image_size, scratch / "bundle")
    results: dict = {"machine": f"{os.cpu_count()} CPU cores", "args": vars(args), "raw": {}}

    print("raw in-process batched forward (batch 32):", flush=True)
    for name, (task, modalities) in SCENARIOS.items():
        raw = raw_baseline(args.bundle, task, modalities, 32, args.seconds, args.image_size or 64)
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
        results["plain"] = run_load(url, args, "plain", plain)
    finally:
        stop(plain)

    placements = {"served": [], **({"in-router": args.in_router} if args.in_router else {})}
    for label, in_router in placements.items():
        config = bench_config(
            args.config, in_router, Path(tempfile.mkdtemp()) / "serve.yaml", args.routers
        )
        port = free_port()
        url = f"127.0.0.1:{port}"
        where = f", {' '.join(in_router)} in the router" if in_router else ""
        print(f"MultiMed Serve (gateway -> router -> encoders{where}; cache off):", flush=True)
        served = start(
            [
                sys.executable,
                "-m",
                "multimed.cli",
                "serve",
                "--config",
                str(config),
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
            profile = Path(args.out).with_suffix("") / label if args.profile else None
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
            results[label] = run_load(url, args, label, served, profile)
        finally:
            stop(served)

    print("\nratios (served / baseline):")
    for label in placements:
        for name in SCENARIOS:
            raw = results["raw"][name]
            for c in args.concurrency:
                key = f"{name}/c{c}"
                s, p = results[label][key], results["plain"][key]
                print(
                    f"  {label:10s} {key:22s} vs raw {s['throughput'] / raw['throughput']:.2f}x  "
                    f"vs plain {s['throughput'] / p['throughput']:.2f}x  "
                    f"p50 - raw single {s['p50_ms'] - raw['single_p50_ms']:+.1f} ms  "
                    f"CPU/req server {s['server_cpu_ms']:.2f} ms (plain {p['server_cpu_ms']:.2f})"
                )
        for key, point in results[label].items():
            for deployment, summary in point.get("profile", {}).items():
                print(
                    f"\nwhere {label} {deployment}'s time goes at {key} "
                    f"({summary['samples']} samples):"
                )
                for area, share in summary["areas"].items():
                    print(f"  {share:6.1%}  {area}")
                for leaf, share in summary["top"]:
                    print(f"  {share:6.1%}  {leaf}")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
