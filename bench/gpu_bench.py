"""GPU benchmark: the imaging encoders at `base` size on CUDA, raw and served, in one run.

(1) raw: each encoder's forward pass on batches already on the GPU, float32 and bfloat16
autocast, at several batch sizes (items/s); (2) served: `multimed serve` with those encoders on
fractions of the GPU (bfloat16, larger batches, cache off) under closed-loop load, with the GPU
utilisation the encoders report in /metrics, as a ratio against (1) on the same GPU.

    .venv/bin/python bench/gpu_bench.py --bundle artifacts/default-bundle

Without CUDA it says so and exits 2; `--device cpu` runs the same steps on the CPU, a check of
the script and not a GPU figure. Every load loop is bounded by a count and a duration; the
server binds 127.0.0.1 and is stopped by pid."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import serving_bench as sb
import torch
import yaml

from multimed.client import loadtest
from multimed.models.bundle import load_bundle
from multimed.models.modalities.registry import build_pipeline

ENCODERS = tuple(sb.CHANNELS)  # the imaging encoders the serving bench's scenarios use


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def raw(bundle_path: str, modality: str, device: str, precision: str, batch: int, seconds: float):
    """Forward passes only, inputs already on the device: the ceiling for serving."""
    bundle = load_bundle(bundle_path)
    pipeline = build_pipeline(modality, bundle.config).setup(device, bundle.encoder_state(modality))
    pipeline.precision = precision
    size = bundle.config.modalities[modality]["image_size"]
    items = sb.make_inputs((modality,), batch, seed=1, size=size)
    on_device = {
        k: v.to(device)
        for k, v in pipeline.collate([pipeline.prepare(i[modality]) for i in items]).items()
    }
    pipeline.forward(on_device)  # warm-up: kernels chosen, memory allocated
    sync(device)
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        pipeline.forward(on_device)
        done += batch
    sync(device)
    return done / (time.perf_counter() - started)


def gpu_config(source: str, device: str, batch: int, out: Path) -> Path:
    """The serving bench's config (cache off) with the three encoders on a quarter of the GPU
    each, in bfloat16 with larger batches."""
    config = yaml.safe_load(sb.bench_config(source, [], out).read_text())
    app = config["applications"][0]
    app["args"]["device"] = device
    deployments = {d["name"]: d for d in app["deployments"]}
    for m in ENCODERS:
        d = deployments.setdefault(f"encoder-{m}", {"name": f"encoder-{m}"})
        if device == "cuda":
            d["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": 0.25}
        d["user_config"] = {"max_batch_size": batch, "precision": "bf16", "torch_threads": 1}
    app["deployments"] = list(deployments.values())
    out.write_text(yaml.safe_dump(config))
    return out


def gpu_utilisation(metrics_url: str) -> dict[str, float]:
    """The encoders' multimed_encoder_gpu_utilization gauges, by modality."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    pattern = r'^multimed_encoder_gpu_utilization\{[^}]*modality="(\w+)"[^}]*\} (\S+)$'
    return {m: float(v) for m, v in re.findall(pattern, text, re.MULTILINE)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="artifacts/default-bundle")
    parser.add_argument("--config", default="deploy/serve_config.yaml")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--serve-batch", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("--out", default="bench/gpu_results.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or --device cpu to check the script")
        sys.exit(2)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (script check)"
    scratch = Path(tempfile.mkdtemp(prefix="multimed-gpu-bench-"))
    bundle = sb.sized_bundle(args.bundle, args.image_size, scratch / "bundle", "base")
    results: dict = {"device": name, "args": vars(args), "raw": {}}
    print(f"{name}: raw forward, base encoders at {args.image_size}px (items/s)", flush=True)
    for m in ENCODERS:
        for precision in ("fp32", "bf16"):
            for batch in args.batches:
                rate = raw(bundle, m, args.device, precision, batch, args.seconds / 2)
                results["raw"][f"{m}/{precision}/b{batch}"] = rate
                print(f"  {m:5s} {precision} batch {batch:4d}: {rate:9.1f}", flush=True)

    config = gpu_config(args.config, args.device, args.serve_batch, scratch / "serve.yaml")
    port, metrics_port = sb.free_port(), sb.free_port()
    url, metrics_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    command = [sys.executable, "-m", "multimed.cli", "serve", "--config", str(config)]
    command += ["--bundle", bundle, "--port", str(port), "--metrics-port", str(metrics_port)]
    served = sb.start(command, url)
    results["served"] = {}
    try:
        for scenario, (task, modalities) in sb.SCENARIOS.items():
            inputs = sb.make_inputs(modalities, 256, seed=2, size=args.image_size)
            requests = loadtest.prepare(loadtest.MULTIMED, task, inputs)
            point = sb.load(
                url, requests, args.concurrency, args.seconds, args.max_requests, served.pid
            )
            point["gpu_utilisation"] = gpu_utilisation(metrics_url)
            ceiling = min(results["raw"][f"{m}/bf16/b{args.serve_batch}"] for m in modalities)
            point["vs_raw"] = point["throughput"] / ceiling
            results["served"][scenario] = point
            print(
                f"served {scenario:15s} c={args.concurrency}: {point['throughput']:8.1f} rps "
                f"({point['vs_raw']:.2f} x raw bf16 batch {args.serve_batch}), p50 "
                f"{point['p50_ms']:.1f} ms, p99 {point['p99_ms']:.1f} ms, errors "
                f"{point['errors']}, server CPU/req {point['server_cpu_ms']:.2f} ms, GPU "
                f"utilisation {point['gpu_utilisation']}",
                flush=True,
            )
    finally:
        sb.stop(served)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
