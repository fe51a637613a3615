"""Distinct valid requests and a bounded asyncio load that records each call's code and latency
(the loadtest command reports aggregates; these tests need every call)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from importlib.resources import files

import grpc
import numpy as np

from multimed.client.channel import ChannelSettings
from multimed.client.sdk import predict_request
from multimed.models.catalog import InputForm
from multimed.models.inputs import RawInput
from multimed.v1 import multimed_pb2 as pb
from multimed.v1 import multimed_pb2_grpc as pb_grpc

GENES = files("multimed.models.resources").joinpath("pbmc68k_genes.txt").read_text().split()
XRAY_TASK = "bone_age_classification"  # X-ray alone
SCRNA_TASK = "cell_type_classification"  # scRNA alone: shares no encoder with XRAY_TASK


def requests(task: str, n: int, seed: int) -> list[pb.PredictRequest]:
    """n distinct requests (the embedding cache never answers them)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if task == XRAY_TASK:
            raw = RawInput("xray", InputForm.TENSOR, rng.random((1, 64, 64), dtype=np.float32))
            out.append(predict_request(task, {"xray": raw}))
        else:
            counts = {
                g: int(c) for g, c in zip(GENES, rng.poisson(2.0, len(GENES)), strict=True) if c
            }
            raw = RawInput("scrna", InputForm.GENE_COUNTS, counts)
            out.append(predict_request(task, {"scrna": raw}))
    return out


@dataclass(frozen=True)
class Call:
    sent: float  # seconds from the load's start
    code: str
    latency_ms: float
    response: pb.PredictResponse | None


async def send(stub, request, token: str, timeout: float, started: float) -> Call:
    t = time.perf_counter()
    try:
        response = await stub.Predict(
            request, timeout=timeout, metadata=(("authorization", f"Bearer {token}"),)
        )
        code = "OK"
    except grpc.aio.AioRpcError as e:
        response, code = None, e.code().name
    return Call(t - started, code, (time.perf_counter() - t) * 1000, response)


async def open_loop(
    url: str,
    token: str,
    batch: list[pb.PredictRequest],
    rate: float,
    timeout: float,
    retries: bool = False,
) -> list[Call]:
    """Each request at its scheduled time (rate per second), whatever the answers do."""
    channel = ChannelSettings(url, retries=retries).aio_channel()
    async with channel:
        stub = pb_grpc.MultiMedStub(channel)
        started = time.perf_counter()
        tasks = []
        for i, request in enumerate(batch):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(stub, request, token, timeout, started)))
        return list(await asyncio.gather(*tasks))


async def closed_loop(
    url: str,
    token: str,
    batch: list[pb.PredictRequest],
    concurrency: int,
    timeout: float,
    retries: bool = True,
) -> list[Call]:
    channel = ChannelSettings(url, retries=retries).aio_channel()
    async with channel:
        stub = pb_grpc.MultiMedStub(channel)
        started, pending, calls = time.perf_counter(), iter(batch), []

        async def worker():
            for request in pending:
                calls.append(await send(stub, request, token, timeout, started))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return calls


def codes(calls: list[Call]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in calls:
        out[c.code] = out.get(c.code, 0) + 1
    return out


def throughput(calls: list[Call]) -> float:
    ok = [c for c in calls if c.code == "OK"]
    span = max(c.sent + c.latency_ms / 1000 for c in calls) - min(c.sent for c in calls)
    return len(ok) / span
