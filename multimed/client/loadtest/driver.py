"""Driving the load: closed loop (`ClosedLoop`: N callers back to back) or open loop
(`OpenLoop`: arrivals at a fixed rate), each phase bounded by both a duration and a request
count, with a warm-up that is not counted."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import ClassVar, TextIO

import grpc
import numpy as np

from multimed.client.channel import ChannelSettings
from multimed.client.loadtest.report import Result, Stats
from multimed.client.loadtest.wire import Api, TaskLoad


class Mix(StrEnum):
    """How several tasks take turns, in rounds of sum(weights) requests."""

    ROUND_ROBIN = "round-robin"  # the same order every round
    RANDOM = "random"  # each round shuffled


class Arrival(StrEnum):
    POISSON = "poisson"  # exponential gaps, as from many independent clients
    FIXED = "fixed"  # evenly spaced

    def gap(self, rate_rps: float, rng: random.Random) -> float:
        return rng.expovariate(rate_rps) if self == Arrival.POISSON else 1 / rate_rps


@dataclass(frozen=True)
class Bounds:
    duration_s: float  # no request is sent after this; those in flight are answered
    max_requests: int

    def __post_init__(self):
        if self.duration_s <= 0 or self.max_requests < 1:
            raise ValueError("a load needs a positive duration and at least one request")


@dataclass(frozen=True)
class ClosedLoop:
    """`concurrency` callers, each sending its next request when its last one is answered."""

    mode: ClassVar[str] = "closed"
    concurrency: int

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {self.concurrency}")

    async def drive(self, phase: _Phase) -> None:
        async def caller(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
            while (item := phase.claim()) is not None:
                await phase.send(call, item, time.perf_counter())

        calls = phase.calls  # callers dealt over the connections
        await asyncio.gather(*(caller(calls[i % len(calls)]) for i in range(self.concurrency)))


@dataclass(frozen=True)
class OpenLoop:
    """Requests at `rate_rps` on a schedule that does not wait for answers. Latency counts from
    the scheduled send, so a server that falls behind shows it rather than slowing the load (no
    coordinated omission). Past `max_outstanding` unanswered requests a send waits for a slot,
    and that wait counts too."""

    mode: ClassVar[str] = "open"
    rate_rps: float
    arrival: Arrival = Arrival.POISSON
    max_outstanding: int = 256

    def __post_init__(self):
        if self.rate_rps <= 0 or self.max_outstanding < 1:
            raise ValueError("an open loop needs a positive rate and max_outstanding")

    async def drive(self, phase: _Phase) -> None:
        rng = random.Random(phase.seed)
        slots = asyncio.Semaphore(self.max_outstanding)
        in_flight: set[asyncio.Task] = set()

        async def one(item: tuple[str, bytes], scheduled: float, call) -> None:
            try:
                await phase.send(call, item, scheduled)
            finally:
                slots.release()

        scheduled = time.perf_counter()
        while (item := phase.claim(scheduled)) is not None:
            await asyncio.sleep(scheduled - time.perf_counter())
            await slots.acquire()
            connection = phase.calls[phase.sent % len(phase.calls)]  # arrivals dealt in turn
            call = asyncio.create_task(one(item, scheduled, connection))
            in_flight.add(call)
            call.add_done_callback(in_flight.discard)
            scheduled += self.arrival.gap(self.rate_rps, rng)
        await asyncio.gather(*in_flight)


@dataclass(frozen=True)
class Plan:
    tasks: tuple[TaskLoad, ...]
    load: ClosedLoop | OpenLoop
    bounds: Bounds
    warmup: Bounds | None = None  # not counted; it draws on the same requests, before the run
    timeout_s: float = 30  # each request's deadline
    repeat_inputs: bool = False  # else each request is sent once, and the run ends when all were
    mix: Mix = Mix.ROUND_ROBIN
    seed: int = 0  # arrivals and the random mix
    # Client connections the load is dealt over. Router replicas on one node share the port and
    # the kernel spreads *connections* across them: one connection loads one replica, however
    # many callers it carries.
    connections: int = 1

    def __post_init__(self):
        if self.connections < 1:
            raise ValueError(f"connections must be at least 1, not {self.connections}")


class _Feed:
    """The next (task, request): tasks dealt by weight in rounds, each task's requests in turn;
    without `repeat_inputs` none is sent twice, so the embedding cache cannot answer."""

    def __init__(self, plan: Plan):
        self.deck = [t for t in plan.tasks for _ in range(t.weight)]
        self.shuffle = random.Random(plan.seed).shuffle if plan.mix == Mix.RANDOM else None
        self.repeat = plan.repeat_inputs
        self.used: Counter[str] = Counter()
        self.round: deque[TaskLoad] = deque()

    def next(self) -> tuple[str, bytes] | None:
        if not self.round:
            deck = list(self.deck)
            if self.shuffle:
                self.shuffle(deck)
            self.round.extend(deck)
        load = self.round.popleft()
        n = self.used[load.task]
        if n >= len(load.requests) and not self.repeat:
            return None
        self.used[load.task] += 1
        return load.task, load.requests[n % len(load.requests)]


class _Phase:
    """One bounded stretch of load (the warm-up, then the run): hands out requests until a bound
    is reached or the inputs run out, sends them, and records each latency or status code."""

    def __init__(
        self,
        calls: list[grpc.aio.UnaryUnaryMultiCallable],
        api: Api,
        feed: _Feed,
        bounds: Bounds,
        plan: Plan,
        metadata: tuple[tuple[str, str], ...],
    ):
        self.calls, self.api, self.feed, self.bounds = calls, api, feed, bounds
        self.timeout_s, self.seed, self.metadata = plan.timeout_s, plan.seed, metadata
        self.run_id = uuid.uuid4().hex[:12]
        self.sent = 0
        self.stopped_by = ""
        self.latencies: defaultdict[str, list[float]] = defaultdict(list)
        # task -> status code -> latency of each call that ended with it
        self.errors: defaultdict[str, defaultdict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.late: list[float] = []  # ms behind its schedule each request was sent
        self.started = self.end = self.finished = time.perf_counter()

    async def run(self, load: ClosedLoop | OpenLoop, progress: TextIO | None, label: str) -> None:
        self.started = time.perf_counter()
        self.end = self.started + self.bounds.duration_s
        ticker = asyncio.create_task(self._report(progress, label)) if progress else None
        try:
            await load.drive(self)
        finally:
            self.finished = time.perf_counter()
            if ticker:
                ticker.cancel()
                progress.write(f"\r{self.status(label)}\n")

    def claim(self, at: float | None = None) -> tuple[str, bytes] | None:
        """The next request to send (now, or at the scheduled time `at`), or None: stop."""
        if self.sent >= self.bounds.max_requests:
            return self._stop("max_requests")
        if max(at or 0.0, time.perf_counter()) >= self.end:
            return self._stop("duration")
        item = self.feed.next()
        if item is None:
            return self._stop("inputs")
        self.sent += 1
        task, request = item
        request_id = self.api.request_id(f"loadtest-{self.run_id}-{self.sent}")
        return task, request + request_id.SerializeToString()

    def _stop(self, why: str) -> None:
        self.stopped_by = self.stopped_by or why

    async def send(self, call, item: tuple[str, bytes], since: float) -> None:
        task, request = item
        self.late.append((time.perf_counter() - since) * 1000)
        try:
            await call(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            self.errors[task][e.code().name].append((time.perf_counter() - since) * 1000)
        else:
            self.latencies[task].append((time.perf_counter() - since) * 1000)

    def status(self, label: str) -> str:
        """A one-line progress bar: the further of time and count towards their bounds."""
        elapsed = time.perf_counter() - self.started
        answered = sum(map(len, self.latencies.values()))
        errors = sum(len(ms) for codes in self.errors.values() for ms in codes.values())
        done = max(elapsed / self.bounds.duration_s, self.sent / self.bounds.max_requests)
        bar = "#" * round(20 * min(done, 1.0))
        return (
            f"{label:8s} [{bar:20s}] {elapsed:6.1f}/{self.bounds.duration_s:g} s  "
            f"{answered + errors}/{self.bounds.max_requests} answered  {errors} errors"
        )

    async def _report(self, stream: TextIO, label: str) -> None:
        while True:
            stream.write(f"\r{self.status(label)}")
            stream.flush()
            await asyncio.sleep(0.25)

    def result(self, plan: Plan, warmup_requests: int) -> Result:
        seconds = self.finished - self.started
        tasks = {
            t.task: Stats.of(self.latencies[t.task], self.errors[t.task], seconds)
            for t in plan.tasks
        }
        every = [ms for values in self.latencies.values() for ms in values]
        errors: defaultdict[str, list[float]] = defaultdict(list)
        for codes in self.errors.values():
            for code, ms in codes.items():
                errors[code].extend(ms)
        late = np.percentile(self.late, [99, 100]) if self.late else [0.0, 0.0]
        return Result(
            api=self.api.name,
            load={"mode": plan.load.mode, **asdict(plan.load)},
            duration_s=round(seconds, 3),
            stopped_by=self.stopped_by,
            warmup_requests=warmup_requests,
            overall=Stats.of(every, errors, seconds),
            tasks=tasks,
            late_p99_ms=round(float(late[0]), 3),
            late_max_ms=round(float(late[1]), 3),
        )


_loads_running = 0  # in this process: the old heap is frozen while any runs


@contextlib.contextmanager
def _old_heap_frozen() -> Iterator[None]:
    """The objects that exist before the load are left out of garbage collection while it runs
    (gc.freeze). A full collection walks every object the process holds, and in a process with
    a large heap (a test session, a notebook, a bench that built its inputs) it paused the
    generator for 0.3 s at a time (286-362 ms over 680k objects): no request went out and no
    answer was read meanwhile, so the pause counted as the server's latency, and the held-back
    requests then went out at once, a burst the server rightly refused. The load's own objects
    are still collected."""
    global _loads_running
    if _loads_running == 0:
        gc.freeze()
    _loads_running += 1
    try:
        yield
    finally:
        _loads_running -= 1
        if _loads_running == 0:
            gc.unfreeze()


async def run_async(
    channel: ChannelSettings, api: Api, plan: Plan, progress: TextIO | None = None
) -> Result:
    """Warm up (if the plan says so), then run the plan; `progress`: a stream for a status
    line rewritten in place."""
    feed = _Feed(plan)
    metadata = channel.metadata()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(_old_heap_frozen())
        opened = [
            await stack.enter_async_context(
                channel.aio_channel(own_connection=plan.connections > 1)
            )
            for _ in range(plan.connections)
        ]
        # bytes in, bytes out: nothing parsed per call
        calls = [c.unary_unary(api.method) for c in opened]
        warmed = 0
        if plan.warmup is not None:
            warmup = _Phase(calls, api, feed, plan.warmup, plan, metadata)
            await warmup.run(plan.load, progress, "warm-up")
            warmed = warmup.sent
        phase = _Phase(calls, api, feed, plan.bounds, plan, metadata)
        await phase.run(plan.load, progress, "load")
    return phase.result(plan, warmed)


def run(channel: ChannelSettings, api: Api, plan: Plan, progress: TextIO | None = None) -> Result:
    return asyncio.run(run_async(channel, api, plan, progress))
