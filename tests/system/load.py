"""Distinct valid requests, and loads on the real server through `multimed loadtest`'s driver
(whose report carries each status code's count and p99 latency)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from servers import session_processes

from multimed.client.channel import ChannelSettings
from multimed.client.loadtest import (
    MULTIMED,
    Arrival,
    Bounds,
    ClosedLoop,
    OpenLoop,
    Plan,
    Result,
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
    return (await load_run(server, task, sent, how, timeout_s, retries)).overall


async def load_run(
    server,
    task: str,
    sent: list[dict[str, RawInput]],
    how: ClosedLoop | OpenLoop,
    timeout_s: float,
    retries: bool = False,
) -> Result:
    """`load`, with the whole run's result (how late the generator sent, too)."""
    duration = len(sent) / how.rate_rps + 1 if isinstance(how, OpenLoop) else 600
    plan = Plan((prepare(MULTIMED, task, sent),), how, Bounds(duration, len(sent)), None, timeout_s)
    channel = ChannelSettings(server.url, server.token, retries=retries)
    return await run_async(channel, MULTIMED, plan)


def open_loop(rate: float, n: int) -> OpenLoop:
    return OpenLoop(rate, Arrival.FIXED, max_outstanding=n)


def codes(stats: Stats) -> dict[str, int]:
    return {**({"OK": stats.ok} if stats.ok else {}), **stats.errors_by_code}


def _pin(pids, cpus: set[int]) -> None:
    """Every thread of these processes onto `cpus` (threads started later inherit it)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:
                continue  # exited meanwhile


@contextmanager
def cores_apart(server):
    """This process (the load generator) alone on the first CPU, the server on the others, as
    if the clients ran on another machine: otherwise a generator at thousands of calls a second
    shares the server's two cores and its own lag is counted as the server's latency."""
    cpus = os.sched_getaffinity(0)
    mine, theirs = {min(cpus)}, cpus - {min(cpus)}
    assert theirs, "needs two CPUs"
    pids = list(session_processes(server.process.pid))
    _pin([os.getpid()], mine)
    _pin(pids, theirs)
    try:
        yield
    finally:
        _pin([os.getpid()], cpus)
        _pin(session_processes(server.process.pid), cpus)
