"""The system tier's scenarios on a running server, shared by its tests, which assert what must
hold on any machine (codes, nothing lost, recovery), and by bench/reliability.py, which records
the figures (refusal p99, health latency, recovery seconds, memory): capacity, overload through
the front, a soak, health while huge requests are read, X-ray replicas killed under load."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from load import (
    SCRNA_TASK,
    XRAY_TASK,
    ClosedLoop,
    codes,
    cores_apart,
    inputs,
    load,
    load_run,
    open_loop,
)
from servers import health, metric, replicas, rss_bytes, scrape, session_processes
from tritonclient.grpc import service_pb2 as oip

from multimed.client.sdk import predict_request
from multimed.models.catalog import InputForm
from multimed.models.inputs import RawInput

TIMEOUT_S = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def capacity(server) -> float:
    """Closed-loop throughput of the scRNA task at concurrency 16 (OK answers per second)."""
    sent = inputs(SCRNA_TASK, 400, seed=10)
    asyncio.run(load(server, SCRNA_TASK, sent[:32], ClosedLoop(8), 30))  # warm
    stats = asyncio.run(load(server, SCRNA_TASK, sent[32:], ClosedLoop(16), 30))
    assert codes(stats) == {"OK": len(sent) - 32}, codes(stats)
    return stats.throughput_rps


@dataclass
class Open:
    """An open loop's outcome: codes, latency figures, how late the generator sent, memory."""

    rate_rps: float
    sent: int
    codes: dict[str, int]
    ok_p50_ms: float
    ok_p99_ms: float
    max_ms: float
    refused_p99_ms: float
    late_p99_ms: float
    late_max_ms: float
    memory_before: int  # bytes, every server process
    memory_after: int

    @property
    def memory_ratio(self) -> float:
        return self.memory_after / self.memory_before

    def line(self, what: str) -> str:
        return (
            f"{what} at {self.rate_rps:.0f}/s, {self.sent} sent: {self.codes}; OK p50 "
            f"{self.ok_p50_ms} ms p99 {self.ok_p99_ms} ms; RESOURCE_EXHAUSTED p99 "
            f"{self.refused_p99_ms:.1f} ms; server memory x{self.memory_ratio:.3f}; sent behind "
            f"schedule p99 {self.late_p99_ms} ms, max {self.late_max_ms} ms"
        )


def _open(server, rate: float, seconds: float, seed: int, apart: bool) -> Open:
    pids = session_processes(server.process.pid)
    sent = inputs(SCRNA_TASK, int(rate * seconds), seed=seed)
    before = rss_bytes(pids)
    how = open_loop(rate, len(sent))
    if apart:
        with cores_apart(server):
            run = asyncio.run(load_run(server, SCRNA_TASK, sent, how, TIMEOUT_S))
    else:
        run = asyncio.run(load_run(server, SCRNA_TASK, sent, how, TIMEOUT_S))
    s = run.overall
    return Open(
        rate,
        len(sent),
        codes(s),
        s.p50_ms,
        s.p99_ms,
        s.max_ms,
        s.error_p99_ms.get("RESOURCE_EXHAUSTED", float("nan")),
        run.late_p99_ms,
        run.late_max_ms,
        before,
        rss_bytes(pids),
    )


def overload(server, capacity_rps: float, factor: float = 10, seconds: float = 4) -> Open:
    """Distinct scRNA calls at `factor` times capacity for `seconds`, through the front, the
    generator on a core of its own and the server on the other (as if the clients ran
    elsewhere: otherwise the generator's own lag is counted as the server's latency)."""
    return _open(server, factor * capacity_rps, seconds, seed=11, apart=True)


def soak(server, capacity_rps: float, seconds: float, fraction: float = 0.7) -> Open:
    """Distinct scRNA calls at `fraction` of capacity for `seconds`, after 10 s of the same."""
    _open(server, fraction * capacity_rps, 10, seed=13, apart=False)  # warm
    return _open(server, fraction * capacity_rps, seconds, seed=14, apart=False)


def huge_bodies() -> list[tuple[str, bytes, grpc.StatusCode]]:
    """(method, body, refused with): bodies near the tests' 4 MB message limit that are costly
    to parse (the BYTES one is refused by item admission: 900,000 items at once)."""
    counts = RawInput("scrna", InputForm.GENE_COUNTS, {f"G{i}": 1.0 for i in range(200_000)})
    predict = predict_request(SCRNA_TASK, {"scrna": counts}).SerializeToString()
    infer = oip.ModelInferRequest(model_name="encoder_text")
    infer.inputs.add(name="text_text", datatype="BYTES", shape=[900_000])
    infer.raw_input_contents.append(struct.pack("<I", 0) * 900_000)  # 900,000 empty strings
    parameters = oip.ModelInferRequest(model_name="encoder_text")
    for i in range(200_000):
        parameters.parameters[f"p{i}"].bool_param = True
    infer_method = "/inference.GRPCInferenceService/ModelInfer"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("/multimed.v1.MultiMed/Predict", predict, invalid),
        (infer_method, infer.SerializeToString(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (infer_method, parameters.SerializeToString(), invalid),
    ]


@dataclass
class HealthProbe:
    """Health checks against the listener, each answer's status and latency, in two phases:
    alone, then while the huge bodies are sent (their codes, per round)."""

    idle_ms: list[float] = field(default_factory=list)
    during_ms: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # each phase's wall time
    statuses: set[int | str] = field(default_factory=set)
    huge_codes: list[list[grpc.StatusCode | None]] = field(default_factory=list)

    def pace(self, during: bool = False) -> float:
        """Checks answered per second, alone or while huge requests are read."""
        checks = self.during_ms if during else self.idle_ms
        return len(checks) / self.seconds["during" if during else "idle"]

    def figures(self) -> dict:
        return {
            "idle_checks_per_s": round(self.pace(), 1),
            "idle_worst_ms": round(max(self.idle_ms), 1),
            "during_checks_per_s": round(self.pace(during=True), 1),
            "during_worst_ms": round(max(self.during_ms), 1),
            "during_p99_ms": round(_p99(self.during_ms), 1),
            "during_s": round(self.seconds["during"], 2),
            "statuses": sorted(map(str, self.statuses)),
        }

    def line(self) -> str:
        return (
            f"health alone: {self.pace():.0f} checks/s, worst {max(self.idle_ms):.0f} ms; while "
            f"huge requests are read ({self.seconds['during']:.1f} s): {self.pace(True):.0f} "
            f"checks/s, worst {max(self.during_ms):.0f} ms, p99 {_p99(self.during_ms):.0f} ms"
        )


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def health_during_huge_requests(server, rounds: int = 10, idle_s: float = 1.0) -> HealthProbe:
    """A prober checks health every 10 ms, first `idle_s` alone, then while `rounds` rounds of
    huge_bodies() are sent at once each."""
    bodies = huge_bodies()
    probe = HealthProbe()
    phase = {"now": probe.idle_ms}
    done = threading.Event()

    def prober():
        with grpc.insecure_channel(server.url) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            check(health_pb2.HealthCheckRequest(), timeout=5)
            while not done.is_set():
                started = time.perf_counter()
                try:
                    probe.statuses.add(check(health_pb2.HealthCheckRequest(), timeout=5).status)
                except grpc.RpcError as e:
                    probe.statuses.add(e.code().name)
                phase["now"].append((time.perf_counter() - started) * 1000)
                time.sleep(0.01)

    thread = threading.Thread(target=prober)
    thread.start()
    metadata = (("authorization", f"Bearer {server.token}"),)
    options = [("grpc.max_send_message_length", 8 << 20)]
    try:
        time.sleep(idle_s)
        phase["now"], started = probe.during_ms, time.monotonic()
        probe.seconds["idle"] = idle_s
        with grpc.insecure_channel(server.url, options=options) as channel:
            for _ in range(rounds):
                calls = [
                    channel.unary_unary(method).future(body, timeout=60, metadata=metadata)
                    for method, body, _ in bodies
                ]
                probe.huge_codes.append([c.exception() and c.exception().code() for c in calls])
        probe.seconds["during"] = time.monotonic() - started
    finally:
        done.set()
        thread.join()
    return probe


def xray_replicas(server) -> list[int]:
    return replicas(server.process.pid).get("encoder-xray", [])


@dataclass
class Killed:
    xray: dict[str, int]
    scrna: dict[str, int]
    scrna_p99_ms: float
    scrna_max_ms: float
    replaced_s: float | None  # the victim gone and two replicas RUNNING again, after the kill

    def line(self) -> str:
        return (
            f"X-ray replica killed under load: X-ray {self.xray}, scRNA {self.scrna} (p99 "
            f"{self.scrna_p99_ms:.0f} ms, max {self.scrna_max_ms:.0f} ms); replaced after "
            f"{self.replaced_s and round(self.replaced_s, 1)} s"
        )


def kill_xray_replica_under_load(server, limit_s: float = 60) -> Killed:
    """X-ray (600 calls, 8 callers) and scRNA (300 calls, 2 callers) loads with the SDK's
    retries; one of the two X-ray replicas is SIGKILLed 2 s in; then the wait (up to `limit_s`)
    for Serve to report two RUNNING replicas again (the server's gauge: not a process still in
    __init__)."""
    victim = xray_replicas(server)[0]

    async def kill():
        await asyncio.sleep(2)
        os.kill(victim, signal.SIGKILL)
        return time.monotonic()

    async def run():
        return await asyncio.gather(
            load(server, XRAY_TASK, inputs(XRAY_TASK, 600, 20), ClosedLoop(8), 30, retries=True),
            load(server, SCRNA_TASK, inputs(SCRNA_TASK, 300, 21), ClosedLoop(2), 30, True),
            kill(),
        )

    xray, scrna, killed_at = asyncio.run(run())
    replaced = None
    while time.monotonic() - killed_at < limit_s:
        running = metric(scrape(server), "multimed_encoder_replicas", modality="xray")
        if victim not in xray_replicas(server) and running >= 2:
            replaced = time.monotonic() - killed_at
            break
        time.sleep(0.5)
    return Killed(codes(xray), codes(scrna), scrna.p99_ms, scrna.max_ms, replaced)


@dataclass
class AllKilled:
    down_s: float | None  # X-ray's task health NOT_SERVING, after the kill
    up_s: float | None  # SERVING again
    others_while_down: set[int | None]  # scRNA's task health and the server's, while down

    def line(self) -> str:
        return (
            f"every X-ray replica killed: X-ray tasks NOT_SERVING after "
            f"{self.down_s and round(self.down_s, 1)} s, SERVING again after "
            f"{self.up_s and round(self.up_s, 1)} s; scRNA and server meanwhile "
            f"{self.others_while_down}"
        )


def kill_every_xray_replica(server, limit_s: float = 120) -> AllKilled:
    """Every X-ray replica SIGKILLed at once; X-ray's task health watched until NOT_SERVING,
    then SERVING again (each within `limit_s`); scRNA's and the server's read while down."""
    killed_at = time.monotonic()
    for pid in xray_replicas(server):
        os.kill(pid, signal.SIGKILL)
    out = AllKilled(None, None, set())
    while time.monotonic() - killed_at < limit_s:
        if health(server.url, f"task/{XRAY_TASK}") == NOT_SERVING:
            out.down_s = time.monotonic() - killed_at
            out.others_while_down = {health(server.url, f"task/{SCRNA_TASK}"), health(server.url)}
            break
        time.sleep(0.2)
    while out.down_s is not None and time.monotonic() - killed_at < limit_s:
        if health(server.url, f"task/{XRAY_TASK}") == SERVING:
            out.up_s = time.monotonic() - killed_at
            break
        time.sleep(0.5)
    return out
