"""The gRPC gateway: a grpc.aio server for multimed.v1 with grpc.health.v1 and reflection. It runs
inside each router replica (measured: a separate gateway process cost one more Ray hop, ~8 ms a
request on 2 cores). Request ids, deadlines, auth, size limits and metrics live here; it converts
wire messages at the edge and holds no state of its own."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from multimed.models.catalog import CATALOG
from multimed.models.errors import Overloaded
from multimed.models.modalities.base import TensorSpec
from multimed.services import convert, inference, metrics
from multimed.services.config import GatewaySettings
from multimed.services.errors import to_status
from multimed.services.oip import build_models
from multimed.services.types import PredictCall

if TYPE_CHECKING:
    from multimed.services.router import Router
from multimed.v1 import multimed_pb2 as pb
from multimed.v1 import multimed_pb2_grpc as pb_grpc

log = logging.getLogger("multimed.gateway")

SERVICE = pb.DESCRIPTOR.services_by_name["MultiMed"].full_name
REQUEST_ID = "x-request-id"
# Probes answer without a token: health, reflection, and the protocol's liveness / readiness.
UNAUTHENTICATED_OK = (
    "/grpc.health.v1.",
    "/grpc.reflection.",
    f"/{inference.SERVICE.full_name}/ServerLive",
    f"/{inference.SERVICE.full_name}/ServerReady",
)


def task_label(task: str) -> str:
    """Metric label for a requested task: unknown names collapse, so a client cannot grow the
    label set without bound."""
    return task if task in CATALOG.tasks else "unknown"


class Coalescer:
    """Sends every Predict call waiting when a slot frees as one router call. There is no fixed
    wait: an idle server sends a lone call at once, and while `slots` batches are in flight new
    calls gather for the next one, so transport overlaps with compute."""

    def __init__(
        self, send: Callable[[list[PredictCall]], Awaitable[list]], max_batch: int, slots: int
    ):
        self.send = send
        self.max_batch = max_batch
        self.slots = slots
        self.waiting: list[tuple[PredictCall, asyncio.Future]] = []
        self.sending: set[asyncio.Future] = set()
        self.busy = 0

    async def submit(self, call: PredictCall):
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((call, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        self.waiting = [(c, f) for c, f in self.waiting if not f.done()]  # callers who gave up
        while self.waiting and self.busy < self.slots:
            batch = self.waiting[: self.max_batch]
            del self.waiting[: self.max_batch]
            self.busy += 1
            task = asyncio.ensure_future(self._send(batch))
            self.sending.add(task)  # held until done, so it is not garbage-collected mid-flight
            task.add_done_callback(self.sending.discard)

    async def _send(self, batch: list[tuple[PredictCall, asyncio.Future]]) -> None:
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


def _loggable(request_id: str) -> str:
    """Client-chosen ids go into logs: keep them short and printable."""
    return "".join(c for c in request_id[:128] if c.isprintable() and not c.isspace())


class MultiMedService(pb_grpc.MultiMedServicer):
    def __init__(self, router: Router, manifest: dict, settings: GatewaySettings):
        self.router = router
        self.coalescer = Coalescer(
            router.predict_many, settings.coalesce_max, settings.coalesce_slots
        )
        self.manifest = manifest
        self.settings = settings
        self.in_flight = 0

    @staticmethod
    def request_id(sent: str, context: grpc.aio.ServicerContext) -> str:
        """The client's id (field, else x-request-id metadata), or a new one."""
        if sent:
            return sent
        return dict(context.invocation_metadata() or ()).get(REQUEST_ID) or uuid.uuid4().hex

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.settings.default_timeout_s if remaining is None else remaining

    async def _attempt(self, method: str, task: str, request_id: str, timeout: float, work):
        """Run one request: admission, deadline, error mapping, metrics and a log line.
        -> (code, message, result)."""
        started = time.perf_counter()
        code, message, result = grpc.StatusCode.OK, "", None
        metrics.IN_FLIGHT.labels(method).inc()
        self.in_flight += 1
        try:
            if self.in_flight > self.settings.max_in_flight:
                raise Overloaded(f"server overloaded: {self.in_flight - 1} requests in flight")
            result = await asyncio.wait_for(work(time.time() + timeout), timeout)
        except asyncio.CancelledError:
            code, message = grpc.StatusCode.CANCELLED, "cancelled"
            raise
        except Exception as error:
            code, message = to_status(error)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("id=%s %s task=%s failed", _loggable(request_id), method, task)
        finally:
            self.in_flight -= 1
            metrics.IN_FLIGHT.labels(method).dec()
            elapsed = time.perf_counter() - started
            metrics.REQUESTS.labels(method, task, code.name).inc()
            metrics.LATENCY.labels(method, task).observe(elapsed)
            log.info(
                "id=%s %s task=%s code=%s ms=%.1f",
                _loggable(request_id),
                method,
                task,
                code.name,
                elapsed * 1000,
            )
        return code, message, result

    async def serve(self, method: str, task: str, request_id: str, context, work):
        """A unary call: the request id goes back in metadata; an error aborts the call."""
        await context.send_initial_metadata(((REQUEST_ID, request_id),))
        code, message, result = await self._attempt(
            method, task, request_id, self._timeout(context), work
        )
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message)
        return result

    async def _predict(self, request: pb.PredictRequest, request_id: str, deadline: float):
        started = time.perf_counter()
        call = PredictCall(
            request_id=request_id,
            task=request.task,
            inputs=tuple(convert.input_from_wire(i) for i in request.inputs),
            explain=request.explain,
            deadline=deadline,
        )
        result = await self.coalescer.submit(call)
        for modality, e in result.encoders.items():
            hit = e.batch_size == 0
            metrics.CACHE.labels(modality, "hit" if hit else "miss").inc()
            if not hit:
                metrics.ENCODED.labels(modality, e.replica).inc()
                metrics.BATCH_SIZE.labels(modality).observe(e.batch_size)
                metrics.ENCODER_QUEUE.labels(modality).set(e.queue_depth)
        return convert.result_to_wire(result, (time.perf_counter() - started) * 1000)

    async def Predict(self, request, context):
        request_id = self.request_id(request.request_id, context)
        return await self.serve(
            "Predict",
            task_label(request.task),
            request_id,
            context,
            lambda deadline: self._predict(request, request_id, deadline),
        )

    async def PredictStream(self, request_iterator, context):
        """Requests run concurrently (at most `stream_concurrency` per stream); each response
        goes out when ready, matched by request_id; a failed request answers with its error."""
        done: asyncio.Queue = asyncio.Queue()
        timeout = self._timeout(context)
        slots = asyncio.Semaphore(self.settings.stream_concurrency)

        async def one(request: pb.PredictRequest):
            request_id = request.request_id or uuid.uuid4().hex
            try:
                code, message, response = await self._attempt(
                    "PredictStream",
                    task_label(request.task),
                    request_id,
                    timeout,
                    lambda deadline: self._predict(request, request_id, deadline),
                )
                if code is not grpc.StatusCode.OK:
                    response = pb.PredictResponse(
                        request_id=request_id,
                        task=request.task,
                        error=pb.Error(code=code.value[0], message=message),
                    )
                await done.put(response)
            finally:
                slots.release()

        async def read():
            try:
                async with asyncio.TaskGroup() as group:
                    async for request in request_iterator:
                        await slots.acquire()  # backpressure on the client's stream
                        group.create_task(one(request))
            finally:
                await done.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await done.get()) is not None:
                yield response
            await reader  # surfaces a broken request stream as this call's error
        finally:
            reader.cancel()

    async def Embed(self, request, context):
        request_id = self.request_id(request.request_id, context)

        async def work(deadline: float):
            raw = convert.input_from_wire(request.input)
            (e,) = await self.router.embed_many([raw], deadline)
            if isinstance(e, Exception):
                raise e
            return convert.embedding_to_wire(request_id, raw.modality, e, self.manifest["version"])

        return await self.serve("Embed", "", request_id, context, work)

    async def GetCatalog(self, request, context):
        return convert.catalog_to_wire()

    async def GetModelInfo(self, request, context):
        return convert.model_info_to_wire(self.manifest)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Bearer-token check on every method but health and reflection."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNAUTHENTICATED_OK):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self.expected):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        async def deny_stream(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            yield  # pragma: no cover - makes this an async generator for streaming handlers

        kind = (handler.request_streaming, handler.response_streaming)
        make = {
            (False, False): (grpc.unary_unary_rpc_method_handler, deny),
            (True, False): (grpc.stream_unary_rpc_method_handler, deny),
            (False, True): (grpc.unary_stream_rpc_method_handler, deny_stream),
            (True, True): (grpc.stream_stream_rpc_method_handler, deny_stream),
        }[kind]
        return make[0](make[1], handler.request_deserializer, handler.response_serializer)


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    inference: inference.InferenceService

    async def set_serving(self, serving: bool) -> None:
        """Health (every service) and the protocol's readiness, together."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE, inference.SERVICE.full_name):
            await self.health.set(name, status)
        self.inference.ready = serving


async def start_gateway(
    router: Router, manifest: dict, specs: dict[str, TensorSpec], settings: GatewaySettings
) -> Gateway:
    """Serve `router` (in this process) over gRPC: multimed.v1 and the Open Inference Protocol
    (`specs`: each modality's model-ready tensor). Not serving until `set_serving(True)`."""
    limit = int(settings.max_message_mb * 1024 * 1024)
    server = grpc.aio.server(
        interceptors=[TokenAuth(settings.auth_token)] if settings.auth_token else None,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Router replicas on one node share the port; the kernel spreads connections.
            ("grpc.so_reuseport", 1),
        ],
    )
    service = MultiMedService(router, manifest, settings)
    pb_grpc.add_MultiMedServicer_to_server(service, server)
    models = build_models(specs, manifest["config"]["embed_dim"])
    inference_service = inference.InferenceService(service, models, settings.coalesce_max)
    inference.oip_grpc.add_GRPCInferenceServiceServicer_to_server(inference_service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, inference.SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    gateway = Gateway(server, port, health_servicer, inference_service)
    await gateway.set_serving(False)
    return gateway
