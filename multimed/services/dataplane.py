"""The data plane under every front door, protocol-free: request ids, admission, deadlines,
coalescing, metrics, the audit log and the error -> status table. A front door converts its wire
messages, describes the call (`CallInfo`) and hands `run` the work; it maps the `Outcome`'s
status onto its protocol."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from multimed.models.errors import Overloaded
from multimed.models.inputs import RawInput
from multimed.services import metrics
from multimed.services.audit import AuditLog, loggable, task_label
from multimed.services.coalesce import Coalescer
from multimed.services.config import GatewaySettings
from multimed.services.errors import Status, to_status
from multimed.services.types import Embedding, PredictCall, PredictResult

log = logging.getLogger("multimed.dataplane")


@dataclass(frozen=True)
class CallInfo:
    """What a front door knows about one call before doing any work."""

    method: str  # the protocol's method name: Predict, ModelInfer, ...
    request_id: str
    caller: str  # the token's name, the client certificate's subject, or "anonymous"
    timeout_s: float  # the caller's remaining deadline, else the server's default


@dataclass(frozen=True)
class Outcome:
    status: Status
    message: str  # for the caller; never quotes a payload
    result: Any = None


class DataPlane:
    def __init__(self, router, settings: GatewaySettings, manifest: dict, audit: AuditLog):
        self.router = router
        self.settings = settings
        self.manifest = manifest
        self.audit = audit
        self.coalescer: Coalescer[PredictCall] = Coalescer(
            router.predict_many, settings.coalesce_max, settings.coalesce_slots
        )
        self.in_flight = 0

    @property
    def bundle_version(self) -> str:
        return self.manifest["version"]

    @staticmethod
    def request_id(*sent: str | None) -> str:
        """The first id the client sent (message field, then metadata), or a new one."""
        return next((s for s in sent if s), None) or uuid.uuid4().hex

    def timeout_s(self, remaining: float | None) -> float:
        return self.settings.default_timeout_s if remaining is None else remaining

    async def run(
        self,
        call: CallInfo,
        task: str,
        modalities: Iterable[str],
        work: Callable[[float], Awaitable[Any]],
    ) -> Outcome:
        """Run one call's `work(deadline)`: admission, deadline, error mapping, metrics and its
        audit line. Cancellation (the caller went away) propagates after it is recorded."""
        started = time.perf_counter()
        label = task_label(task)
        status, message, result = Status.OK, "", None
        metrics.IN_FLIGHT.labels(call.method).inc()
        self.in_flight += 1
        try:
            if self.in_flight > self.settings.max_in_flight:
                raise Overloaded(f"server overloaded: {self.in_flight - 1} requests in flight")
            deadline = time.time() + call.timeout_s
            result = await asyncio.wait_for(work(deadline), call.timeout_s)
        except asyncio.CancelledError:
            status, message = Status.CANCELLED, "cancelled"
            raise
        except Exception as error:
            status, message = to_status(error)
            if status is Status.INTERNAL:
                log.exception(
                    "id=%s %s task=%s failed", loggable(call.request_id), call.method, label
                )
        finally:
            self.in_flight -= 1
            metrics.IN_FLIGHT.labels(call.method).dec()
            elapsed = time.perf_counter() - started
            metrics.REQUESTS.labels(call.method, label, status.name).inc()
            metrics.LATENCY.labels(call.method, label).observe(elapsed)
            self.audit.record(
                request_id=call.request_id,
                caller=call.caller,
                method=call.method,
                task=task,
                modalities=modalities,
                code=status.name,
                latency_ms=elapsed * 1000,
            )
        return Outcome(status, message, result)

    async def predict(self, call: PredictCall) -> PredictResult:
        """One task call, coalesced with every other waiting one into a router batch."""
        result = await self.coalescer.submit(call)
        for modality, e in result.encoders.items():
            hit = e.batch_size == 0
            metrics.CACHE.labels(modality, "hit" if hit else "miss").inc()
            if not hit:
                metrics.ENCODED.labels(modality, e.replica).inc()
                metrics.BATCH_SIZE.labels(modality).observe(e.batch_size)
                metrics.ENCODER_QUEUE.labels(modality).set(e.queue_depth)
        return result

    async def embed(self, raws: list[RawInput], deadline: float) -> list[Embedding | Exception]:
        """Encoder outputs for inputs of any modalities; an input's error comes as its value."""
        return await self.router.embed_many(raws, deadline)
