"""Triton's per-model statistics, as perf_analyzer reads them between its measurement windows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tritonclient.grpc import service_pb2 as oip

from multimed.services.frontends.oip.models import VERSION


def _duration(count: int = 0, ns: int = 0) -> oip.StatisticDuration:
    return oip.StatisticDuration(count=count, ns=ns)


@dataclass
class ModelStats:
    """Triton's statistics for one model, as perf_analyzer reads them between its windows."""

    last_inference_ms: int = 0
    inference_count: int = 0  # items
    execution_count: int = 0  # requests (each ran as one batch here)
    success: list[int] = field(default_factory=lambda: [0, 0])  # count, ns
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)  # size -> count, in, infer, out

    def record(self, ok: bool, items: int, total_ns: int, timing: tuple[int, int, int]) -> None:
        self.last_inference_ms = int(time.time() * 1000)
        if not ok:
            self.fail[0] += 1
            self.fail[1] += total_ns
            return
        input_ns, infer_ns, output_ns = timing
        self.success[0] += 1
        self.success[1] += total_ns
        self.inference_count += items
        self.execution_count += 1
        self.input_ns += input_ns
        self.infer_ns += infer_ns
        self.output_ns += output_ns
        self.queue_ns += max(total_ns - input_ns - infer_ns - output_ns, 0)
        batch = self.batches.setdefault(items, [0, 0, 0, 0])
        for i, value in enumerate((1, input_ns, infer_ns, output_ns)):
            batch[i] += value

    def to_wire(self, name: str) -> oip.ModelStatistics:
        successes = self.success[0]
        return oip.ModelStatistics(
            name=name,
            version=VERSION,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=oip.InferStatistics(
                success=_duration(*self.success),
                fail=_duration(*self.fail),
                queue=_duration(successes, self.queue_ns),
                compute_input=_duration(successes, self.input_ns),
                compute_infer=_duration(successes, self.infer_ns),
                compute_output=_duration(successes, self.output_ns),
            ),
            batch_stats=[
                oip.InferBatchStatistics(
                    batch_size=size,
                    compute_input=_duration(n, i),
                    compute_infer=_duration(n, c),
                    compute_output=_duration(n, o),
                )
                for size, (n, i, c, o) in sorted(self.batches.items())
            ],
        )
