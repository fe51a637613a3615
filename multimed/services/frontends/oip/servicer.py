"""`inference.GRPCInferenceService` on the shared listener. ModelInfer goes through the data plane
(admission, deadline, request id, coalescing, metrics, audit, error table) like every front door;
the metadata calls answer from the models' specs."""

from __future__ import annotations

import asyncio
import logging
import time
from importlib.metadata import version

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from multimed.models.outputs import output_of
from multimed.services.dataplane import DataPlane
from multimed.services.frontends.bounds import map_limit
from multimed.services.frontends.grpc_common import (
    NOT_READY,
    Door,
    answer,
    call_info,
    offload,
)
from multimed.services.frontends.oip.convert import (
    Decoded,
    pad_stack,
    request_from_wire,
    response_to_wire,
)
from multimed.services.frontends.oip.models import VERSION, Models, ModelSpec
from multimed.services.frontends.oip.stats import ModelStats
from multimed.services.types import PredictCall

log = logging.getLogger("multimed.oip")
# Per `parameters` map (request, input, output): the protocol's own parameters are a handful.
MAX_PARAMETERS = 64
SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
EXTENSIONS = ("model_configuration", "statistics")
# Liveness and readiness probes answer without a token.
PROBES = ("ServerLive", "ServerReady")


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """Methods not defined here answer UNIMPLEMENTED (see the loop below the class)."""

    def __init__(self, plane: DataPlane, models: Models):
        self.plane = plane
        self.models = models
        self.stats = {name: ModelStats() for name in models}
        self.readiness = NOT_READY

    def model_ready(self, name: str) -> bool:
        """A task model while the encoders it needs have live replicas; an encoder model while
        its encoder has one."""
        model = self.models.by_name.get(name)
        if model is None:
            return False
        if model.task is not None:
            return self.readiness.task_ready(model.task)
        return self.readiness.encoder_ready(model.modalities[0])

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self.readiness.serving)

    async def ModelReady(self, request, context):
        known = request.version in ("", VERSION)
        return oip.ModelReadyResponse(ready=known and self.model_ready(request.name))

    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(
            name="multimed-serve", version=version("multimed-serve"), extensions=EXTENSIONS
        )

    # Metadata calls raise; the guard maps their errors through the status table.
    async def ModelMetadata(self, request, context):
        return self.models.metadata(self.models.get(request.name, request.version))

    async def ModelConfig(self, request, context):
        model = self.models.get(request.name, request.version)
        return oip.ModelConfigResponse(config=self.models.config(model))

    async def ModelStatistics(self, request, context):
        names = (
            [self.models.get(request.name, request.version).name]
            if request.name
            else [*self.models]
        )
        return oip.ModelStatisticsResponse(model_stats=[self.stats[n].to_wire(n) for n in names])

    async def RepositoryIndex(self, request, context):
        states = {n: "READY" if self.model_ready(n) else "UNAVAILABLE" for n in self.models}
        return oip.RepositoryIndexResponse(
            models=[
                oip.RepositoryIndexResponse.ModelIndex(name=n, version=VERSION, state=state)
                for n, state in states.items()
                if not request.ready or state == "READY"
            ]
        )

    async def ModelInfer(self, request, context):
        call = call_info(self.plane, context, "ModelInfer", request.id)
        started = time.perf_counter_ns()
        timing = [0, 0, 0]
        items = 0
        modalities: set[str] = set()  # those the request carried, for the audit line

        async def work(deadline: float):
            nonlocal items
            model = self.models.get(request.model_name, request.model_version)
            decoded = await offload(request_from_wire, model, request, self.models.max_batch_size)
            modalities.update(decoded.carriers)
            items = len(decoded.items)
            decoded_at = time.perf_counter_ns()
            if model.task is None:
                arrays = await self._embed(model, decoded, deadline)
            else:
                arrays = await self._predict(model, decoded, call.request_id, deadline)
            inferred_at = time.perf_counter_ns()
            response = response_to_wire(model, request.id, decoded.outputs, arrays)
            timing[:] = (
                decoded_at - started,
                inferred_at - decoded_at,
                time.perf_counter_ns() - inferred_at,
            )
            return response

        try:
            outcome = self.plane.run(call, request.model_name, modalities, work, _items(request))
            return await answer(context, call, outcome)
        finally:
            stats = self.stats.get(request.model_name)
            if stats is not None:
                ok = timing[1] > 0
                stats.record(ok, items, time.perf_counter_ns() - started, tuple(timing))

    async def _predict(self, model: ModelSpec, decoded: Decoded, request_id: str, deadline):
        calls = [
            PredictCall(f"{request_id}/{b}", model.task.id, tuple(row), deadline=deadline)
            for b, row in enumerate(decoded.items)
        ]
        results = await asyncio.gather(
            *(self.plane.predict(c) for c in calls), return_exceptions=True
        )
        for b, result in enumerate(results):
            if isinstance(result, BaseException):
                raise decoded.located(result, b)
        arrays = {
            "scores": pad_stack(
                [np.asarray(r.prediction.scores, dtype=np.float32) for r in results], 0.0
            )
        }
        if output_of(model.task.output).predicts_labels:
            arrays["labels"] = pad_stack(
                [np.asarray(r.prediction.predicted, dtype=object) for r in results], b""
            )
        ood = [[r.out_of_distribution.get(m) for m in model.task.accepted] for r in results]
        arrays["ood_score"] = np.array(
            [[np.nan if o is None else o.score for o in row] for row in ood], dtype=np.float32
        )
        arrays["ood_flag"] = np.array([[o is not None and o.flagged for o in row] for row in ood])
        return arrays

    async def _embed(self, model: ModelSpec, decoded: Decoded, deadline: float):
        results = await self.plane.embed([row[0] for row in decoded.items], deadline)
        for b, result in enumerate(results):
            if isinstance(result, Exception):
                raise decoded.located(result, b)
        arrays = {"embedding": np.stack([e.pooled for e in results])}
        if any(o.name == "tokens" for o in model.outputs):
            arrays["tokens"] = pad_stack([e.tokens for e in results], 0.0)
        arrays["descriptor"] = np.stack([e.descriptor for e in results])
        return arrays


def _items(request: oip.ModelInferRequest) -> int:
    """The batch size the request declares (its first input's first dimension), so that
    admission counts a 64-item request as 64 before decoding any of it."""
    shape = request.inputs[0].shape if request.inputs else ()
    return max(1, min(shape[0], 1 << 20)) if shape else 1


def _unimplemented(name: str, streaming: bool):
    message = f"{name} is not supported by MultiMed Serve; supported: " + ", ".join(
        m for m in SERVICE.methods_by_name if m in InferenceService.__dict__
    )
    if streaming:

        async def method(self, request_iterator, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            yield  # pragma: no cover - makes this an async generator

    else:

        async def method(self, request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return method


# The generated base class answers UNKNOWN under grpc.aio (it raises NotImplementedError after
# setting the code): every method we do not implement answers UNIMPLEMENTED instead.
for _method in SERVICE.methods:
    if _method.name not in InferenceService.__dict__:
        setattr(
            InferenceService, _method.name, _unimplemented(_method.name, _method.server_streaming)
        )


def register(server: grpc.aio.Server, door: Door) -> InferenceService:
    """Add the protocol to the listener; readiness follows the listener's health."""
    models = Models(door.signatures, door.plane.settings.coalesce_max)
    service = InferenceService(door.plane, models)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    door.add_service(SERVICE.full_name, PROBES)
    door.on_readiness(lambda readiness: setattr(service, "readiness", readiness))
    door.prechecks[oip.ModelInferRequest.DESCRIPTOR.full_name] = map_limit(
        oip.ModelInferRequest, MAX_PARAMETERS, _over_parameter_limit
    )
    return service


def _over_parameter_limit(field: str, entries: int) -> str:
    return f"a {field} map has {entries} entries, over the {MAX_PARAMETERS} limit"
