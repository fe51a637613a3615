"""Faults on the real server: an encoder replica SIGKILLed under load."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from grpc_health.v1 import health_pb2
from load import SCRNA_TASK, XRAY_TASK, ClosedLoop, codes, inputs, load
from servers import health, metric, replicas, scrape


def _xray_replicas(server) -> list[int]:
    return replicas(server.process.pid).get("encoder-xray", [])


async def _kill_under_load(server, victim: int):
    """X-ray and scRNA loads with the SDK's retries; the victim dies 2 s in."""

    async def kill():
        await asyncio.sleep(2)
        os.kill(victim, signal.SIGKILL)
        return time.monotonic()

    return await asyncio.gather(
        load(server, XRAY_TASK, inputs(XRAY_TASK, 600, 20), ClosedLoop(8), 30, retries=True),
        load(server, SCRNA_TASK, inputs(SCRNA_TASK, 300, 21), ClosedLoop(2), 30, retries=True),
        kill(),
    )


def test_encoder_replica_killed_under_load(server):
    """With the SDK's default retries nothing is lost; tasks that do not need X-ray see no
    stall; the replica is back within 30 s."""
    replicas = _xray_replicas(server)
    assert len(replicas) == 2, replicas
    xray, scrna, killed_at = asyncio.run(_kill_under_load(server, replicas[0]))
    print(
        f"X-ray replica killed: X-ray {codes(xray)}, scRNA {codes(scrna)}; "
        f"scRNA p99 {scrna.p99_ms:.0f} ms"
    )
    assert codes(xray) == {"OK": 600}
    assert codes(scrna) == {"OK": 300}
    assert scrna.max_ms < 2000
    # Replaced means RUNNING by Serve's account (the server's gauge), not a process in __init__.
    while (
        replicas[0] in _xray_replicas(server)
        or metric(scrape(server), "multimed_encoder_replicas", modality="xray") < 2
    ):
        assert time.monotonic() - killed_at < 30, "X-ray replica not replaced in 30 s"
        time.sleep(0.5)
    print(f"replica replaced after {time.monotonic() - killed_at:.1f} s")


def test_health_follows_the_encoders(server):
    """With every X-ray replica dead, X-ray tasks are NOT_SERVING and fail at once with
    UNAVAILABLE; scRNA tasks stay SERVING; all come back."""
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    killed_at = time.monotonic()
    for pid in _xray_replicas(server):
        os.kill(pid, signal.SIGKILL)
    seen_down = None
    while time.monotonic() - killed_at < 30:
        if health(server.url, f"task/{XRAY_TASK}") == not_serving:
            seen_down = time.monotonic() - killed_at
            assert health(server.url, f"task/{SCRNA_TASK}") == serving
            assert health(server.url, "") == serving
            break
        time.sleep(0.2)
    assert seen_down is not None, "X-ray task never reported NOT_SERVING"
    while health(server.url, f"task/{XRAY_TASK}") != serving:
        assert time.monotonic() - killed_at < 60, "X-ray task not SERVING again in 60 s"
        time.sleep(0.5)
    print(
        f"X-ray tasks NOT_SERVING after {seen_down:.1f} s, SERVING again after "
        f"{time.monotonic() - killed_at:.1f} s"
    )
