"""The data plane under every front door, protocol-free: request ids, admission, deadlines,
coalescing, metrics, the audit log and the error -> status table. A front door converts its wire
messages, describes the call (`CallInfo`) and hands `run` the work; it maps the `Outcome`'s
status onto its protocol."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import string
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from multimed.models.catalog import CATALOG
from multimed.models.inputs import RawInput
from multimed.services import metrics
from multimed.services.admission import Admission
from multimed.services.audit import MAX_ID, AuditLog, loggable, modality_label, task_label
from multimed.services.coalesce import Coalescer
from multimed.services.config import GatewaySettings
from multimed.services.errors import Status, to_status
from multimed.services.types import Embedding, PredictCall, PredictResult

log = logging.getLogger("multimed.dataplane")
# Request-id characters kept as sent: printable ASCII but "%" (the escape) and space.
ID_SAFE = "".join(c for c in string.printable if c not in "% " and c.isprintable())


def lane(modalities: Iterable[str]) -> tuple[str, ...]:
    """The encoders a call needs: its coalescer and its admission lane."""
    return tuple(sorted(set(modalities) & CATALOG.modalities.keys()))


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
        # One coalescer per set of modalities: a batch waits for every encoder it needs, so
        # calls that need other encoders must not queue behind it.
        self.coalescers: dict[tuple[str, ...], Coalescer[PredictCall]] = {}
        self.admission = Admission(settings.max_in_flight)

    def _coalescer(self, call: PredictCall) -> Coalescer[PredictCall]:
        key = lane(r.modality for r in call.inputs)
        coalescer = self.coalescers.get(key)
        if coalescer is None:
            coalescer = self.coalescers[key] = Coalescer(
                self.router.predict_many,
                self.settings.coalesce_max,
                self.settings.coalesce_slots,
                _dropped,
            )
        return coalescer

    @property
    def mutual_tls(self) -> bool:
        """Whether the listener asks clients for a certificate (callers are then named by it)."""
        return self.settings.tls is not None and self.settings.tls.client_ca is not None

    @property
    def bundle_version(self) -> str:
        return self.manifest["version"]

    @staticmethod
    def request_id(*sent: str | None) -> str:
        """The first id the client sent (message field, then metadata), or a new one. Ids go
        back in metadata, which takes printable ASCII only: anything else is percent-encoded
        (an accented patient id still round-trips), and a long id is cut to MAX_ID characters,
        its end replaced by a digest of the whole, so distinct ids stay distinct."""
        chosen = next((s for s in sent if s), None)
        if chosen is None:
            return uuid.uuid4().hex
        safe = quote(chosen, safe=ID_SAFE, errors="replace")
        if len(safe) <= MAX_ID:
            return safe
        digest = hashlib.sha256(chosen.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return f"{safe[: MAX_ID - 17]}~{digest}"

    def timeout_s(self, remaining: float | None) -> float:
        return self.settings.default_timeout_s if remaining is None else remaining

    async def run(
        self,
        call: CallInfo,
        task: str,
        modalities: Iterable[str],
        work: Callable[[float], Awaitable[Any]],
        items: int = 1,
    ) -> Outcome:
        """Run one call's `work(deadline)`: admission, deadline, error mapping, metrics and its
        audit line. Admission counts items (a 64-item ModelInfer is 64): past `max_in_flight`
        the call is refused before any work. Cancellation (the caller went away) propagates
        after it is recorded."""
        started = time.perf_counter()
        label = task_label(task)
        modalities = tuple(modalities)
        needs = lane(modalities)
        status, message, result = Status.OK, "", None
        metrics.IN_FLIGHT.labels(call.method).inc(items)
        try:
            self.admission.admit(items, call.timeout_s, needs)
            deadline = time.time() + call.timeout_s
            async with asyncio.timeout(call.timeout_s):  # no task per call, as wait_for makes
                result = await work(deadline)
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
            self.admission.release(items, status is Status.OK, needs)
            metrics.IN_FLIGHT.labels(call.method).dec(items)
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
        result = await self._coalescer(call).submit(call)
        for modality, e in result.encoders.items():
            hit = e.batch_size == 0
            metrics.CACHE.labels(modality, "hit" if hit else "miss").inc()
            if not hit:
                metrics.ENCODED.labels(modality, e.replica).inc()
                metrics.BATCH_SIZE.labels(modality).observe(e.batch_size)
                metrics.ENCODER_QUEUE.labels(modality).set(e.queue_depth)
                if e.gpu_utilization is not None:
                    metrics.GPU_UTILIZATION.labels(modality, e.replica).set(e.gpu_utilization)
        return result

    async def embed(self, raws: list[RawInput], deadline: float) -> list[Embedding | Exception]:
        """Encoder outputs for inputs of any modalities; an input's error comes as its value."""
        return await self.router.embed_many(raws, deadline)


def _dropped(call: PredictCall) -> None:
    expired = call.deadline is not None and call.deadline <= time.time()
    for raw in call.inputs:
        metrics.DROPPED.labels(
            modality_label(raw.modality), "expired" if expired else "cancelled"
        ).inc()
