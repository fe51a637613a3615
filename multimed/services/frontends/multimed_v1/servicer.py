"""`multimed.v1.MultiMed` on the shared listener: each method converts at the edge and hands the
work to the data plane."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import replace

import grpc

from multimed.models.catalog import CATALOG
from multimed.models.modalities.scrna import MAX_GENES
from multimed.services.dataplane import CallInfo, DataPlane, Outcome
from multimed.services.errors import Status
from multimed.services.frontends.bounds import map_limit
from multimed.services.frontends.grpc_common import Door, answer, call_info, offload
from multimed.services.frontends.guard import Unparseable
from multimed.services.frontends.multimed_v1.convert import (
    catalog_to_wire,
    embedding_to_wire,
    model_info_to_wire,
    request_from_wire,
    response_to_wire,
)
from multimed.services.frontends.multimed_v1.inputs import input_from_wire
from multimed.v1 import multimed_pb2 as pb
from multimed.v1 import multimed_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["MultiMed"].full_name


class MultiMedService(pb_grpc.MultiMedServicer):
    def __init__(self, plane: DataPlane, stream_concurrency: int):
        self.plane = plane
        self.stream_concurrency = stream_concurrency

    async def _predict(self, request: pb.PredictRequest, request_id: str, deadline: float):
        started = time.perf_counter()
        call = await offload(request_from_wire, request, request_id, deadline)
        result = await self.plane.predict(call)
        return response_to_wire(result, (time.perf_counter() - started) * 1000)

    def _run(self, call: CallInfo, request: pb.PredictRequest) -> Awaitable[Outcome]:
        return self.plane.run(
            call,
            request.task,
            (i.modality for i in request.inputs),
            lambda deadline: self._predict(request, call.request_id, deadline),
        )

    async def Predict(self, request, context):
        call = call_info(self.plane, context, "Predict", request.request_id)
        return await answer(context, call, self._run(call, request))

    async def PredictStream(self, request_iterator, context):
        """Requests run concurrently (at most `stream_concurrency` per stream); each response
        goes out when ready, matched by request_id; a failed request, or one that does not
        parse, answers with its error and the stream goes on. Answers wait in a buffer of
        `stream_concurrency`: a client that stops reading stops the stream's work, not the
        server's memory. A stream lives at most `max_stream_s`."""
        stream = call_info(self.plane, context, "PredictStream")
        slots = asyncio.Semaphore(self.stream_concurrency)
        done: asyncio.Queue = asyncio.Queue(self.stream_concurrency)

        async def one(request: pb.PredictRequest | Unparseable):
            try:
                if isinstance(request, Unparseable):
                    await done.put(
                        _error_response("", "", Status.INVALID_ARGUMENT, request.message)
                    )
                    return
                call = replace(stream, request_id=self.plane.request_id(request.request_id))
                outcome = await self._run(call, request)
                response = outcome.result
                if response is None:
                    task = request.task if request.task in CATALOG.tasks else ""  # never echo junk
                    response = _error_response(
                        call.request_id, task, outcome.status, outcome.message
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
            async with asyncio.timeout(self.plane.settings.max_stream_s):
                while (response := await done.get()) is not None:
                    yield response
                await reader  # surfaces a broken request stream as this call's error
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"stream open over {self.plane.settings.max_stream_s:g} s; open a new one",
            )
        finally:
            reader.cancel()

    async def Embed(self, request, context):
        call = call_info(self.plane, context, "Embed", request.request_id)

        async def work(deadline: float):
            raw = await offload(input_from_wire, request.input)
            (e,) = await self.plane.embed([raw], deadline)
            if isinstance(e, Exception):
                raise e
            return embedding_to_wire(call.request_id, raw.modality, e, self.plane.bundle_version)

        outcome = self.plane.run(call, "", (request.input.modality,), work)
        return await answer(context, call, outcome)

    async def GetCatalog(self, request, context):
        return catalog_to_wire()

    async def GetModelInfo(self, request, context):
        return model_info_to_wire(self.plane.manifest)


def _error_response(request_id: str, task: str, status: Status, message: str):
    return pb.PredictResponse(
        request_id=request_id, task=task, error=pb.Error(code=status.grpc_code, message=message)
    )


def _over_gene_limit(field: str, entries: int) -> str:
    """The scRNA codec's own words (its map is the only one in a Predict body)."""
    return f"scrna: gene count map has {entries} entries, over the {MAX_GENES} limit"


def register(server: grpc.aio.Server, door: Door) -> MultiMedService:
    service = MultiMedService(door.plane, door.plane.settings.stream_concurrency)
    pb_grpc.add_MultiMedServicer_to_server(service, server)
    door.add_service(SERVICE)
    door.prechecks[pb.PredictRequest.DESCRIPTOR.full_name] = map_limit(
        pb.PredictRequest, MAX_GENES, _over_gene_limit
    )
    return service
