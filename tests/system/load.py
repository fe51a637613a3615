"""Distinct valid requests, and loads on the real server through `multimed loadtest`'s driver
(whose report carries each status code's count and p99 latency)."""

from __future__ import annotations

import numpy as np

from multimed.client.channel import ChannelSettings
from multimed.client.loadtest import (
    MULTIMED,
    Arrival,
    Bounds,
    ClosedLoop,
    OpenLoop,
    Plan,
    Stats,
    prepare,
    run_async,
)
from multimed.models.catalog import PBMC_GENES, InputForm
from multimed.models.inputs import RawInput

GENES = PBMC_GENES
XRAY_TASK = "bone_age_classification"  # X-ray alone
SCRNA_TASK = "cell_type_classification"  # scRNA alone: shares no encoder with XRAY_TASK


def inputs(task: str, n: int, seed: int) -> list[dict[str, RawInput]]:
    """n distinct inputs for the task (the embedding cache never answers them)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if task == XRAY_TASK:
            image = rng.random((1, 64, 64), dtype=np.float32)
            out.append({"xray": RawInput("xray", InputForm.TENSOR, image)})
        else:
            counts = rng.poisson(2.0, len(GENES))
            data = {g: int(c) for g, c in zip(GENES, counts, strict=True) if c}
            out.append({"scrna": RawInput("scrna", InputForm.GENE_COUNTS, data)})
    return out


async def load(
    server,
    task: str,
    sent: list[dict[str, RawInput]],
    how: ClosedLoop | OpenLoop,
    timeout_s: float,
    retries: bool = False,
) -> Stats:
    """Every request in `sent` once (an open loop: all sent in len/rate seconds, none held back
    for lack of an outstanding slot); `retries`: the SDK's default retry policy."""
    duration = len(sent) / how.rate_rps + 1 if isinstance(how, OpenLoop) else 600
    plan = Plan((prepare(MULTIMED, task, sent),), how, Bounds(duration, len(sent)), None, timeout_s)
    channel = ChannelSettings(server.url, server.token, retries=retries)
    return (await run_async(channel, MULTIMED, plan)).overall


def open_loop(rate: float, n: int) -> OpenLoop:
    return OpenLoop(rate, Arrival.FIXED, max_outstanding=n)


def codes(stats: Stats) -> dict[str, int]:
    return {**({"OK": stats.ok} if stats.ok else {}), **stats.errors_by_code}
