"""The nginx front (gateway.front) before a real grpc.aio listener on its unix socket: refusals
past max_calls, health unlimited, TLS ended at nginx, no connection closed under a flood of
refused bodies, a clear error when it cannot start, and no orphan when its replica dies. The
whole server behind it is tested through it too: the session server runs `--front`."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from certs import authority
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from servers import free_port

from multimed.services.config import GatewaySettings
from multimed.services.frontends.front import Front

SLOW = "/test.Slow/Call"  # a limited method: it answers after `hold_s`
Request, Response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse


@asynccontextmanager
async def fronted(hold_s: float, max_calls: int, tls: dict | None = None):
    """A listener with SLOW and grpc.health.v1 (SERVING) behind a started front."""
    settings = GatewaySettings(port=free_port(), tls=tls, front={"max_calls": max_calls})
    front = Front(settings)

    async def slow(request, context):
        await asyncio.sleep(hold_s)
        return Response(status=Response.SERVING)

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        slow, Request.FromString, Response.SerializeToString
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Slow", {"Call": handler}),)
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(front.upstream())
    await server.start()
    front.start()
    try:
        yield settings.port
    finally:
        front.stop(1)
        await server.stop(None)


def _slow(channel: grpc.aio.Channel):
    return channel.unary_unary(SLOW, Request.SerializeToString, Response.FromString)


async def _codes(calls) -> collections.Counter:
    seen: collections.Counter = collections.Counter()
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        seen[outcome.code().name if isinstance(outcome, grpc.aio.AioRpcError) else "OK"] += 1
    return seen


def test_past_max_calls_refused_at_once_while_health_answers():
    async def run():
        async with (
            fronted(hold_s=3.0, max_calls=4) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            calls = [_slow(channel)(Request(), timeout=10) for _ in range(4)]
            await asyncio.sleep(0.3)  # the four are taken
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _slow(channel)(Request(), timeout=10)
            refused_ms = (time.perf_counter() - started) * 1000
            # Probes are never limited: a liveness check must not fail under overload.
            probe = health_pb2_grpc.HealthStub(channel).Check(Request(), timeout=5)
            assert (await probe).status == Response.SERVING
            assert await _codes(calls) == {"OK": 4}
        return refused, refused_ms

    refused, refused_ms = asyncio.run(run())
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "overloaded" in refused.value.details()
    assert refused_ms < 1500  # at once, not when the held calls end (3 s)


def test_refused_bodies_do_not_close_the_connection():
    """Thousands of refused 8 KB bodies on one connection: nginx would close it as a flood
    (GOAWAY) and fail the calls it had accepted, unless refused calls never send their body."""

    async def run():
        async with (
            fronted(hold_s=1.0, max_calls=2) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            body = Request(service="x" * 8000)
            calls = []
            for _ in range(2000):
                calls.append(_slow(channel)(body, timeout=20))
                await asyncio.sleep(0.0002)
            return await _codes(calls)

    seen = asyncio.run(run())
    assert set(seen) == {"OK", "RESOURCE_EXHAUSTED"}, seen
    assert seen["OK"] >= 2


def test_tls_ends_at_the_front(tmp_path):
    ca = authority(tmp_path, "hospital-ca")
    pair = ca.issue(tmp_path, "server", server=True)

    async def run():
        async with fronted(0.0, 8, tls={"cert": str(pair.cert), "key": str(pair.key)}) as port:
            credentials = grpc.ssl_channel_credentials(ca.path.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
                answer = await _slow(channel)(Request(), timeout=10)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _slow(plain)(Request(), timeout=5)
        return answer, refused

    answer, refused = asyncio.run(run())
    assert answer.status == Response.SERVING
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as taken:  # no SO_REUSEPORT: nginx cannot share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        front = Front(GatewaySettings(port=taken.getsockname()[1], front={}))
        with pytest.raises(RuntimeError, match=r"nginx did not start on 127\.0\.0\.1"):
            front.start()
    assert not front.run.exists()  # its directory is gone with it


def test_mutual_tls_and_port_zero_are_refused_in_the_config():
    with pytest.raises(ValueError, match="mutual TLS"):
        GatewaySettings(front={}, tls={"cert": "c", "key": "k", "client_ca": "ca"})
    with pytest.raises(ValueError, match="fixed port"):
        GatewaySettings(port=0, front={})


STARTER = """
import sys, time
from multimed.services.config import GatewaySettings
from multimed.services.frontends.front import Front
front = Front(GatewaySettings(port=int(sys.argv[1]), front={}))
front.start()
print(front.process.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_nginx_dies_with_its_replica():
    """A replica SIGKILLed leaves no nginx holding the port for its replacement."""
    port = free_port()
    replica = subprocess.Popen([sys.executable, "-c", STARTER, str(port)], stdout=subprocess.PIPE)
    try:
        nginx = int(replica.stdout.readline())
        os.kill(replica.pid, signal.SIGKILL)
        replica.wait()
        deadline = time.monotonic() + 10
        while _alive(nginx):
            assert time.monotonic() < deadline, "nginx outlived its replica"
            time.sleep(0.1)
        with socket.socket() as again:  # the port is free for the replacement
            again.bind(("127.0.0.1", port))
    finally:
        replica.kill()
        replica.wait()
