"""A run's numbers, per task and overall, and their table."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Stats:
    """Latencies are of the answered (OK) requests; an error is counted by its status code, and
    how long each code took to come back is its p99 (a refusal should be fast)."""

    requests: int
    ok: int
    errors_by_code: dict[str, int]
    throughput_rps: float  # OK answers per second
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    error_p99_ms: dict[str, float]

    @classmethod
    def of(cls, latencies: list[float], errors: dict[str, list[float]], seconds: float) -> Stats:
        """`errors`: per status code, the latency of each call that ended with it."""
        marks = np.percentile(latencies, [50, 90, 99, 100]) if latencies else [None] * 4
        p50, p90, p99, most = (None if m is None else round(float(m), 3) for m in marks)
        failed = sum(map(len, errors.values()))
        return cls(
            requests=len(latencies) + failed,
            ok=len(latencies),
            errors_by_code={code: len(ms) for code, ms in sorted(errors.items())},
            throughput_rps=round(len(latencies) / seconds, 3) if seconds > 0 else 0.0,
            p50_ms=p50,
            p90_ms=p90,
            p99_ms=p99,
            max_ms=most,
            error_p99_ms={
                code: round(float(np.percentile(ms, 99)), 3) for code, ms in sorted(errors.items())
            },
        )


@dataclass(frozen=True)
class Result:
    api: str
    load: dict[str, object]  # the mode and its settings: concurrency, or rate and arrivals
    duration_s: float  # first send to last answer
    stopped_by: str  # "duration", "max_requests" or "inputs"
    warmup_requests: int
    overall: Stats
    tasks: dict[str, Stats]
    # How far behind its schedule the generator sent (open loop): its own lag, or every one of
    # max_outstanding requests unanswered. It is within every latency above, so a large figure
    # says the generator, not the server, set them.
    late_p99_ms: float = 0.0
    late_max_ms: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(result: Result) -> str:
    load = ", ".join(f"{k} {v}" for k, v in result.load.items())
    lines = [
        f"{result.api}: {load}; {result.duration_s:.1f} s, stopped by {result.stopped_by}"
        f" ({result.warmup_requests} warm-up requests not counted)",
        f"{'task':38s} {'requests':>8s} {'ok':>7s} {'ok/s':>8s} {'p50 ms':>8s} {'p90 ms':>8s} "
        f"{'p99 ms':>8s} {'max ms':>8s}  errors",
    ]
    rows = {**result.tasks, "all": result.overall} if len(result.tasks) > 1 else result.tasks
    for name, s in rows.items():
        errors = (
            ", ".join(
                f"{code} {n} (p99 {s.error_p99_ms[code]:.1f} ms)"
                for code, n in s.errors_by_code.items()
            )
            or "-"
        )
        lines.append(
            f"{name:38s} {s.requests:8d} {s.ok:7d} {s.throughput_rps:8.1f} {_ms(s.p50_ms):>8s} "
            f"{_ms(s.p90_ms):>8s} {_ms(s.p99_ms):>8s} {_ms(s.max_ms):>8s}  {errors}"
        )
    if result.load.get("mode") == "open":
        lines.append(
            f"sent behind schedule: p99 {result.late_p99_ms:.1f} ms, max {result.late_max_ms:.1f}"
            " ms (the generator's own lag, or max_outstanding reached; within every latency)"
        )
    return "\n".join(lines)
