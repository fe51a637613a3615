"""Reliability figures: the system tier's scenarios (tests/system/scenarios.py) on a server
started as the system tier starts it (tests/servers.py: its own local Ray, X-ray at two
replicas, a token, the nginx front), measured instead of asserted. In order: scRNA capacity
(closed loop, 16 callers); overload at 10x capacity through the front (refusal p99, the
generator on a core of its own); health while huge requests are read (checks per second and
latency, alone and during); an X-ray replica SIGKILLed under load (codes, scRNA latency,
seconds to a replacement); every X-ray replica SIGKILLed (seconds to NOT_SERVING and back); a
soak at 70 % of capacity (codes, latency, resident memory of every server process).

    .venv/bin/python bench/reliability.py --bundle artifacts/default-bundle --soak-seconds 600

Each phase's figures print as it ends, and all go to --out as JSON. Bounded by count and time;
the server binds 127.0.0.1 and is stopped by pid."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "system")]

import scenarios  # noqa: E402
from servers import Server, running_server, serve_config  # noqa: E402


def _sorted(values: set) -> list:
    """A set of health statuses (None where a check failed) as a JSON list."""
    return sorted(values, key=str)


def _record(figures: dict, name: str, result, line: str) -> None:
    if hasattr(result, "figures"):
        figures[name] = result.figures()
    elif dataclasses.is_dataclass(result):
        figures[name] = json.loads(json.dumps(dataclasses.asdict(result), default=_sorted))
    else:
        figures[name] = result
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="artifacts/default-bundle")
    parser.add_argument("--soak-seconds", type=float, default=120)
    parser.add_argument("--out", default="bench/reliability.json")
    args = parser.parse_args()
    figures: dict = {"date": time.strftime("%Y-%m-%d"), "soak_seconds": args.soak_seconds}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = Path(args.bundle).resolve()
        config = serve_config(work / "serve_config.yaml", bundle)
        with running_server(work, config, extra=("--front",)) as (url, metrics, process):
            server = Server(url, metrics, bundle, work, process)
            rps = scenarios.capacity(server)
            _record(figures, "capacity_rps", round(rps, 1), f"capacity {rps:.0f} requests/s")
            over = scenarios.overload(server, rps)
            _record(figures, "overload", over, over.line("overload"))
            probe = scenarios.health_during_huge_requests(server)
            _record(figures, "health", probe, probe.line())
            killed = scenarios.kill_xray_replica_under_load(server)
            _record(figures, "replica_killed", killed, killed.line())
            all_killed = scenarios.kill_every_xray_replica(server)
            _record(figures, "all_killed", all_killed, all_killed.line())
            soak = scenarios.soak(server, rps, args.soak_seconds)
            _record(figures, "soak", soak, soak.line(f"soak {args.soak_seconds:.0f} s"))
    Path(args.out).write_text(json.dumps(figures, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
