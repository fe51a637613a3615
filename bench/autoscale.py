"""Autoscaling timeline: the system tier's autoscaling run (tests/system/scaling.py: X-ray read
at 384x384, autoscaled from one replica on inputs in flight, cache off), loaded in phases of
closed-loop X-ray callers, sliced every --every seconds: per slice the X-ray replicas (as the
gateway's /metrics reports them), OK answers per second, p50 and p99. Writes the slices as JSON
and a plot as PNG.

    .venv/bin/python bench/autoscale.py --bundle artifacts/default-bundle

--phases is CALLERS:SECONDS ... (0 callers: no load). Every load is bounded by time and count;
the server binds 127.0.0.1 and is stopped by pid."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "system")]

from load import XRAY_TASK, codes  # noqa: E402
from scaling import ReplicaLog, autoscaling_config, xray_bound_bundle  # noqa: E402
from servers import Server, running_server  # noqa: E402

from multimed.client.channel import ChannelSettings  # noqa: E402
from multimed.client.loadtest import MULTIMED, Bounds, ClosedLoop, Plan, prepare, run_async  # noqa: E402
from multimed.client.loadtest.inputs import synthetic_inputs  # noqa: E402

DISTINCT = 256  # X-ray DICOMs, cycled: the server's cache is off


def phases(text: str) -> list[tuple[int, float]]:
    """'0:10 64:60' -> [(0, 10.0), (64, 60.0)]: callers and seconds per phase."""
    return [(int(c), float(s)) for c, s in (p.split(":") for p in text.split())]


async def timeline(server: Server, log: ReplicaLog, plan: list[tuple[int, float]], every: float):
    """Slices of `every` seconds through the phases, each with its own figures."""
    requests = (
        prepare(MULTIMED, XRAY_TASK, synthetic_inputs([(XRAY_TASK, 1)], DISTINCT)[XRAY_TASK]),
    )
    channel = ChannelSettings(server.url, server.token)
    slices = []
    for callers, seconds in plan:
        phase_end = log.now() + seconds
        while (left := phase_end - log.now()) > 0.5:
            start = log.now()
            length = min(every, left)
            if callers:
                bounds = Bounds(length, 10**6)
                how = Plan(requests, ClosedLoop(callers), bounds, None, 30, repeat_inputs=True)
                stats = (await run_async(channel, MULTIMED, how)).overall
            else:
                await asyncio.sleep(length)
                stats = None
            seen = [n for t, n in log.samples if start <= t <= log.now()]
            slices.append(
                {
                    "t0_s": round(start, 1),
                    "t_s": round(log.now(), 1),
                    "callers": callers,
                    "replicas": seen[-1] if seen else None,
                    "replicas_max": max(seen, default=None),
                    "ok_per_s": stats.throughput_rps if stats else 0.0,
                    "p50_ms": stats.p50_ms if stats else None,
                    "p99_ms": stats.p99_ms if stats else None,
                    "codes": codes(stats) if stats else {},
                }
            )
            print(row(slices[-1]), flush=True)
    return slices


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def row(s: dict) -> str:
    """A slice as a Markdown table row, for bench/RESULTS.md."""
    errors = {k: v for k, v in s["codes"].items() if k != "OK"} or "-"
    return (
        f"| {s['t_s']:5.0f} | {s['callers']:3d} | {s['replicas']} (max {s['replicas_max']}) "
        f"| {s['ok_per_s']:5.0f} | {_ms(s['p50_ms'])} | {_ms(s['p99_ms'])} | {errors} |"
    )


def plot(slices: list[dict], samples: list[tuple[float, int]], path: Path) -> None:
    """Replicas over time above; each slice's OK/s and p99 below; loaded slices shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.step([t for t, _ in samples], [n for _, n in samples], where="post")
    top.set_ylabel("X-ray replicas RUNNING")
    top.set_ylim(0, max(n for _, n in samples) + 1)
    starts, ends = [s["t0_s"] for s in slices], [s["t_s"] for s in slices]
    bottom.hlines([s["ok_per_s"] for s in slices], starts, ends, color="C2", lw=2)
    bottom.set_ylabel("OK answers / s", color="C2")
    bottom.set_xlabel("seconds")
    p99 = bottom.twinx()
    loaded = [s for s in slices if s["callers"]]
    p99.hlines(
        [s["p99_ms"] for s in loaded],
        [s["t0_s"] for s in loaded],
        [s["t_s"] for s in loaded],
        color="C3",
        lw=2,
    )
    p99.set_ylabel("p99 ms", color="C3")
    for s in loaded:
        for axis in (top, bottom):
            axis.axvspan(s["t0_s"], s["t_s"], color="grey", alpha=0.06 + s["callers"] / 400, lw=0)
    for s, before in zip(slices, [None, *slices[:-1]], strict=True):
        if s["callers"] and (before is None or before["callers"] != s["callers"]):
            top.annotate(f"{s['callers']} callers", (s["t0_s"], 0.2), fontsize=9)
    top.set_title("X-ray encoder autoscaled on inputs in flight (shaded: closed-loop X-ray load)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="artifacts/default-bundle")
    parser.add_argument("--phases", default="0:10 4:30 64:60 0:60", type=phases)
    parser.add_argument("--every", type=float, default=5, help="seconds per slice")
    parser.add_argument("--out", default="bench/autoscale.json")
    parser.add_argument("--plot", default="bench/autoscale.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = xray_bound_bundle(Path(args.bundle).resolve(), work / "bundle")
        config = autoscaling_config(work / "serve_config.yaml", bundle)
        with running_server(work, config) as (url, metrics, process):
            server = Server(url, metrics, bundle, work, process)
            with ReplicaLog(server) as log:
                print("|     t |   c | replicas | OK/s | p50 ms | p99 ms | errors |")
                print("|---|---|---|---|---|---|---|")
                slices = asyncio.run(timeline(server, log, args.phases, args.every))
    samples = [(round(t, 1), n) for t, n in log.samples]
    out = {"phases": args.phases, "slices": slices, "replicas_every_0.5_s": samples}
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(slices, log.samples, Path(args.plot))
    print(f"wrote {args.out} and {args.plot} ({time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
