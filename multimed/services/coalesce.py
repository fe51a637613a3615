"""Coalescing: every Predict call waiting when a slot frees goes to the router as one call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Call = TypeVar("Call")


class Coalescer(Generic[Call]):
    """There is no fixed wait: an idle server sends a lone call at once, and while `slots`
    batches are in flight new calls gather for the next one, so transport overlaps with compute.
    `send` answers a batch with one result (or exception, as a value) per call, in order."""

    def __init__(
        self,
        send: Callable[[list[Call]], Awaitable[list]],
        max_batch: int,
        slots: int,
        dropped: Callable[[Call], None] = lambda call: None,
    ):
        self.send = send
        self.dropped = dropped  # told of each call whose caller gave up before it was sent
        self.max_batch = max_batch
        self.slots = slots
        self.waiting: list[tuple[Call, asyncio.Future]] = []
        self.sending: set[asyncio.Future] = set()
        self.busy = 0

    async def submit(self, call: Call):
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((call, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        waiting = []
        for call, future in self.waiting:
            if future.done():  # its caller gave up: never sent
                self.dropped(call)
            else:
                waiting.append((call, future))
        self.waiting = waiting
        while self.waiting and self.busy < self.slots:
            batch = self.waiting[: self.max_batch]
            del self.waiting[: self.max_batch]
            self.busy += 1
            task = asyncio.ensure_future(self._send(batch))
            self.sending.add(task)  # held until done, so it is not garbage-collected mid-flight
            task.add_done_callback(self.sending.discard)

    async def _send(self, batch: list[tuple[Call, asyncio.Future]]) -> None:
        try:
            results = await self.send([call for call, _ in batch])
        except Exception as error:  # the whole router call failed
            results = [error] * len(batch)
        finally:
            self.busy -= 1
        try:
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller gave up (deadline, cancellation)
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            for _, future in batch:  # never leave a caller waiting on a broken answer
                if not future.done():
                    future.set_exception(RuntimeError("router answered the batch incompletely"))
            self._dispatch()
