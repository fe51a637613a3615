"""Admission: whether the data plane takes a new call or refuses it at once with
RESOURCE_EXHAUSTED: items in flight against `max_in_flight`, then the queue ahead at the measured
completion pace against the call's deadline. Refusing at once beats accepting a call to miss its
deadline later.

The queue and the pace are a lane's: calls that need the same encoders (the data plane's
coalescers are keyed the same way). Calls waiting on an encoder that lost its replica are not
a queue ahead of calls that need other encoders, and a stalled lane's pace is its own: with one
global pace, 500 scRNA calls stuck for a replica lost with the head node, over X-ray's pace,
refused scRNA calls a moment from recovery (CI, a head restart)."""

from __future__ import annotations

import time
from collections import deque

from multimed.models.errors import Overloaded

# A call is refused when the work queued ahead of it would take more than this share of its
# deadline.
ADMIT_FRACTION = 0.8


class Pace:
    """How fast items complete, over the last WINDOW_S: the queue ahead of a new call, divided
    by it, is how long that call would wait."""

    WINDOW_S = 2.0
    MIN_SAMPLES = 20

    def __init__(self):
        self.completions: deque[tuple[float, int]] = deque()
        self.count = 0

    def done(self, items: int) -> None:
        self.completions.append((self._forget_old(), items))
        self.count += items

    def wait_s(self, queued: int) -> float:
        """0 until the window holds MIN_SAMPLES completions (a pace from a handful, right after
        a lull, would refuse calls an idle server could answer at once)."""
        now = self._forget_old()
        if self.count < self.MIN_SAMPLES:
            return 0.0
        span = max(now - self.completions[0][0], 0.1)
        return queued * span / self.count

    def _forget_old(self) -> float:
        """Drop completions older than the window; -> now."""
        now = time.monotonic()
        while self.completions and self.completions[0][0] < now - self.WINDOW_S:
            self.count -= self.completions.popleft()[1]
        return now


class Lane:
    """One lane's items in flight and completion pace."""

    def __init__(self):
        self.in_flight = 0
        self.pace = Pace()


class Admission:
    """The items in flight (all lanes: `max_in_flight` bounds the server's memory) and the two
    refusals of the module docstring."""

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.lanes: dict[tuple[str, ...], Lane] = {}

    def admit(self, items: int, timeout_s: float, lane: tuple[str, ...]) -> None:
        """Counts the call's items in (`release` counts them out, whatever happens); raises
        Overloaded when it is refused. `lane`: the encoders the call needs, sorted."""
        own = self.lanes.setdefault(lane, Lane())
        self.in_flight += items
        own.in_flight += items
        ahead = self.in_flight - items
        if items > self.max_in_flight:
            raise Overloaded(
                f"this call's {items} items are over the server's limit of {self.max_in_flight} "
                "in flight; split it into smaller calls"
            )
        if self.in_flight > self.max_in_flight:
            raise Overloaded(
                f"server overloaded: {ahead} items in flight, limit {self.max_in_flight}; "
                "retry with backoff"
            )
        wait = own.pace.wait_s(own.in_flight - items)
        if wait > timeout_s * ADMIT_FRACTION:
            raise Overloaded(
                f"server overloaded: the queue ahead takes ~{wait:.1f} s, past this call's "
                f"{timeout_s:.1f} s deadline; retry with backoff"
            )

    def release(self, items: int, answered: bool, lane: tuple[str, ...]) -> None:
        """`answered`: it completed OK (only those set the pace)."""
        own = self.lanes[lane]
        if answered:
            own.pace.done(items)
        own.in_flight -= items
        self.in_flight -= items
