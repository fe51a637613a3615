"""Soak: the system tier's 3-minute soak, at length. `multimed serve` started as the system tier
starts it (tests/servers.py: its own local Ray, X-ray at two replicas, a token), its capacity
measured (scRNA task, closed loop, 16 callers), then distinct scRNA calls in an open loop at 70 %
of it for --seconds; reports errors by code, latency percentiles per interval, and the resident
memory of every server process sampled every --every seconds.

    .venv/bin/python bench/soak.py --bundle artifacts/default-bundle --seconds 600

Bounded by count and time; the server binds 127.0.0.1 and is stopped by pid."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "system")]

from load import SCRNA_TASK, ClosedLoop, codes, inputs, load, open_loop  # noqa: E402
from servers import (  # noqa: E402
    Server,
    rss_bytes,
    running_server,
    serve_config,
    session_processes,
)

TIMEOUT_S = 5.0


async def soak(server, pids, rate: float, seconds: float, every: float) -> list[dict]:
    """The open loop in `every`-second slices (each its own figures), memory after each."""
    slices, seed = [], 100
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        n = int(rate * min(every, seconds - (time.monotonic() - started)))
        if n < 1:
            break
        stats = await load(
            server, SCRNA_TASK, inputs(SCRNA_TASK, n, seed), open_loop(rate, n), TIMEOUT_S
        )
        seed += 1
        slices.append(
            {
                "t_s": round(time.monotonic() - started),
                "codes": codes(stats),
                "p50_ms": stats.p50_ms,
                "p99_ms": stats.p99_ms,
                "max_ms": stats.max_ms,
                "rss_mib": rss_bytes(pids) / 2**20,
            }
        )
        s = slices[-1]
        print(
            f"  {s['t_s']:4d} s  {s['codes']}  p50 {s['p50_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms"
            f"  max {s['max_ms']:.0f} ms  server RSS {s['rss_mib']:.0f} MiB",
            flush=True,
        )
    return slices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="artifacts/default-bundle")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--fraction", type=float, default=0.7, help="of measured capacity")
    parser.add_argument("--every", type=float, default=30, help="seconds per reported slice")
    parser.add_argument("--out", default="bench/soak.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = Path(args.bundle).resolve()
        config = serve_config(work / "serve_config.yaml", bundle)
        with running_server(work, config) as (url, metrics, process):
            server = Server(url, metrics, bundle, work, process)
            pids = session_processes(process.pid)
            sent = inputs(SCRNA_TASK, 2000, seed=10)
            asyncio.run(load(server, SCRNA_TASK, sent[:200], ClosedLoop(8), 30))  # warm
            cap = asyncio.run(load(server, SCRNA_TASK, sent[200:], ClosedLoop(16), 30))
            rate = args.fraction * cap.throughput_rps
            print(f"capacity {cap.throughput_rps:.0f} requests/s; soak at {rate:.0f}/s", flush=True)
            warm = inputs(SCRNA_TASK, int(rate * 20), seed=11)
            asyncio.run(load(server, SCRNA_TASK, warm, open_loop(rate, len(warm)), TIMEOUT_S))
            before = rss_bytes(pids) / 2**20
            slices = asyncio.run(soak(server, pids, rate, args.seconds, args.every))
    totals = dict(sum((Counter(s["codes"]) for s in slices), Counter()))
    summary = {
        "capacity_rps": cap.throughput_rps,
        "rate_rps": rate,
        "seconds": args.seconds,
        "codes": totals,
        "rss_before_mib": before,
        "rss_after_mib": slices[-1]["rss_mib"],
        "rss_growth": slices[-1]["rss_mib"] / before - 1,
        "worst_p99_ms": max(s["p99_ms"] for s in slices),
        "slices": slices,
    }
    print(
        f"soak {args.seconds:.0f} s at {rate:.0f}/s: {totals}; worst p99 of a slice "
        f"{summary['worst_p99_ms']:.1f} ms; server RSS {before:.0f} -> "
        f"{summary['rss_after_mib']:.0f} MiB ({summary['rss_growth']:+.1%})"
    )
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
