"""`inference.GRPCInferenceService` (the Open Inference Protocol that Triton and KServe speak) on
the gateway's port, from the service definitions that ship in tritonclient. Requests go through
the same admission, deadline, metrics and error table as multimed.v1 (`MultiMedService`)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from importlib.metadata import version

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from multimed.models.catalog import CATALOG
from multimed.models.errors import InputError, MissingModality
from multimed.services.errors import to_status
from multimed.services.oip import (
    VERSION,
    ModelNotFound,
    ModelSpec,
    ProtocolError,
    config,
    item_input,
    metadata,
    output_tensor,
    pad_stack,
    read_input,
)
from multimed.services.types import PredictCall

log = logging.getLogger("multimed.inference")
SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
EXTENSIONS = ("model_configuration", "statistics")


def _duration(count: int = 0, ns: int = 0) -> oip.StatisticDuration:
    return oip.StatisticDuration(count=count, ns=ns)


@dataclass
class ModelStats:
    """Triton's statistics for one model, as perf_analyzer reads them between its windows."""

    last_inference_ms: int = 0
    inference_count: int = 0  # items
    execution_count: int = 0  # requests (each ran as one batch here)
    success: list[int] = field(default_factory=lambda: [0, 0])  # count, ns
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)  # size -> count, in, infer, out

    def record(self, ok: bool, items: int, total_ns: int, timing: tuple[int, int, int]) -> None:
        self.last_inference_ms = int(time.time() * 1000)
        if not ok:
            self.fail[0] += 1
            self.fail[1] += total_ns
            return
        input_ns, infer_ns, output_ns = timing
        self.success[0] += 1
        self.success[1] += total_ns
        self.inference_count += items
        self.execution_count += 1
        self.input_ns += input_ns
        self.infer_ns += infer_ns
        self.output_ns += output_ns
        self.queue_ns += max(total_ns - input_ns - infer_ns - output_ns, 0)
        batch = self.batches.setdefault(items, [0, 0, 0, 0])
        for i, value in enumerate((1, input_ns, infer_ns, output_ns)):
            batch[i] += value

    def to_wire(self, name: str) -> oip.ModelStatistics:
        successes = self.success[0]
        return oip.ModelStatistics(
            name=name,
            version=VERSION,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=oip.InferStatistics(
                success=_duration(*self.success),
                fail=_duration(*self.fail),
                queue=_duration(successes, self.queue_ns),
                compute_input=_duration(successes, self.input_ns),
                compute_infer=_duration(successes, self.infer_ns),
                compute_output=_duration(successes, self.output_ns),
            ),
            batch_stats=[
                oip.InferBatchStatistics(
                    batch_size=size,
                    compute_input=_duration(n, i),
                    compute_infer=_duration(n, c),
                    compute_output=_duration(n, o),
                )
                for size, (n, i, c, o) in sorted(self.batches.items())
            ],
        )


@dataclass
class Decoded:
    """A ModelInfer request checked against its model: per item, its inputs."""

    items: list[list]
    carriers: dict[str, str]  # modality -> the input that carried it (for error messages)


def _alternatives(model: ModelSpec, modality: str) -> str:
    return " or ".join(repr(t.name) for t in model.inputs if t.modality == modality)


def decode_request(model: ModelSpec, request: oip.ModelInferRequest, max_batch: int) -> Decoded:
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(raws)} entries for {len(request.inputs)} inputs"
        )
    carriers: dict[str, str] = {}
    arrays = []
    for i, tensor in enumerate(request.inputs):
        info = model.input(tensor.name)
        if info.modality in carriers:
            raise ProtocolError(
                f"inputs {carriers[info.modality]!r} and {info.name!r} both carry "
                f"{info.modality}; send one form per modality"
            )
        array = read_input(tensor, raws[i] if raws else None, info, max_batch)
        if arrays and array.shape[0] != arrays[0][1].shape[0]:
            first = arrays[0][0].name
            raise ProtocolError(
                f"input {info.name!r} has batch size {array.shape[0]}, but {first!r} has "
                f"{arrays[0][1].shape[0]}"
            )
        carriers[info.modality] = info.name
        arrays.append((info, array))
    if model.task is None and not arrays:
        raise ProtocolError(
            f"model {model.name!r} needs one input of: {_alternatives(model, model.modalities[0])}"
        )
    if model.task is not None:
        try:
            CATALOG.task(model.task).check_modalities(carriers)
        except MissingModality as e:
            missing = [m for m in model.modalities if m not in carriers]
            wanted = "; ".join(f"{m}: {_alternatives(model, m)}" for m in missing)
            raise ProtocolError(f"{e} (inputs for {wanted})") from None
    batch = arrays[0][1].shape[0] if arrays else 0
    items = []
    for b in range(batch):
        row = []
        for info, array in arrays:
            try:
                row.append(item_input(info, array[b]))
            except InputError as e:
                raise _located(e, carriers, b, batch) from None
        items.append(row)
    return Decoded(items, carriers)


def _located(error: BaseException, carriers: dict[str, str], item: int, batch: int):
    """An input's error, told which tensor (and batch item) it came from."""
    if isinstance(error, InputError) and error.modality in carriers:
        where = f"input {carriers[error.modality]!r}" + (f", item {item}" if batch > 1 else "")
        return InputError(error.modality, f"{error.problem} ({where})")
    return error


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """Methods not defined here answer UNIMPLEMENTED (see the loop below the class)."""

    def __init__(self, service, models: dict[str, ModelSpec], max_batch: int):
        self.service = service  # the MultiMedService: admission, deadlines, metrics, errors
        self.models = models
        self.max_batch = max_batch
        self.stats = {name: ModelStats() for name in models}
        self.ready = False

    def _model(self, name: str, model_version: str = "") -> ModelSpec:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}; models: {', '.join(self.models)}")
        if model_version not in ("", VERSION):
            raise ModelNotFound(f"model {name!r} has no version {model_version!r} (versions: 1)")
        return model

    async def _answer(self, context, work):
        """Metadata calls: the same error table, no request metrics."""
        try:
            return work()
        except Exception as error:
            code, message = to_status(error)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s failed", type(self).__name__)
            await context.abort(code, message)

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request, context):
        known = request.name in self.models and request.version in ("", VERSION)
        return oip.ModelReadyResponse(ready=self.ready and known)

    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(
            name="multimed-serve", version=version("multimed-serve"), extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request, context):
        return await self._answer(
            context, lambda: metadata(self._model(request.name, request.version))
        )

    async def ModelConfig(self, request, context):
        def work():
            model = self._model(request.name, request.version)
            return oip.ModelConfigResponse(config=config(model, self.max_batch))

        return await self._answer(context, work)

    async def ModelStatistics(self, request, context):
        def work():
            names = (
                [self._model(request.name, request.version).name] if request.name else self.models
            )
            return oip.ModelStatisticsResponse(
                model_stats=[self.stats[n].to_wire(n) for n in names]
            )

        return await self._answer(context, work)

    async def RepositoryIndex(self, request, context):
        state = "READY" if self.ready else "UNAVAILABLE"
        return oip.RepositoryIndexResponse(
            models=[
                oip.RepositoryIndexResponse.ModelIndex(name=n, version=VERSION, state=state)
                for n in self.models
                if not request.ready or self.ready
            ]
        )

    async def ModelInfer(self, request, context):
        request_id = self.service.request_id(request.id, context)
        started = time.perf_counter_ns()
        timing = [0, 0, 0]
        items = 0

        async def work(deadline: float):
            nonlocal items
            model = self._model(request.model_name, request.model_version)
            decoded = decode_request(model, request, self.max_batch)
            items = len(decoded.items)
            wanted = _requested(model, request)
            decoded_at = time.perf_counter_ns()
            if model.task is None:
                outputs = await self._embed(model, decoded, deadline)
            else:
                outputs = await self._predict(model, decoded, request_id, deadline)
            inferred_at = time.perf_counter_ns()
            response = oip.ModelInferResponse(
                model_name=model.name, model_version=VERSION, id=request.id
            )
            for info in model.outputs:
                if info.name in wanted:
                    tensor, raw = output_tensor(info.name, info.datatype, outputs[info.name])
                    response.outputs.append(tensor)
                    response.raw_output_contents.append(raw)
            timing[:] = (
                decoded_at - started,
                inferred_at - decoded_at,
                time.perf_counter_ns() - inferred_at,
            )
            return response

        name = request.model_name if request.model_name in self.models else "unknown"
        try:
            return await self.service.serve("ModelInfer", name, request_id, context, work)
        finally:
            stats = self.stats.get(request.model_name)
            if stats is not None:
                ok = timing[1] > 0
                stats.record(ok, items, time.perf_counter_ns() - started, tuple(timing))

    async def _predict(self, model: ModelSpec, decoded: Decoded, request_id: str, deadline):
        calls = [
            PredictCall(f"{request_id}/{b}", model.task, tuple(row), deadline=deadline)
            for b, row in enumerate(decoded.items)
        ]
        results = await asyncio.gather(
            *(self.service.coalescer.submit(c) for c in calls), return_exceptions=True
        )
        for b, result in enumerate(results):
            if isinstance(result, BaseException):
                raise _located(result, decoded.carriers, b, len(results))
        per_token = CATALOG.task(model.task).token_modality is not None
        scores = [np.asarray(r.prediction.scores, dtype=np.float32) for r in results]
        labels = [np.asarray(r.prediction.predicted, dtype=object) for r in results]
        return {
            "scores": pad_stack(scores, 0.0) if per_token else np.stack(scores),
            "labels": pad_stack(labels, b""),
        }

    async def _embed(self, model: ModelSpec, decoded: Decoded, deadline: float):
        results = await self.service.router.embed_many([row[0] for row in decoded.items], deadline)
        for b, result in enumerate(results):
            if isinstance(result, Exception):
                raise _located(result, decoded.carriers, b, len(results))
        outputs = {"embedding": np.stack([e.pooled for e in results])}
        if len(model.outputs) > 1:
            outputs["tokens"] = pad_stack([e.tokens for e in results], 0.0)
        return outputs


def _requested(model: ModelSpec, request: oip.ModelInferRequest) -> set[str]:
    names = {o.name for o in model.outputs}
    asked = {o.name for o in request.outputs}
    unknown = asked - names
    if unknown:
        raise ProtocolError(
            f"model {model.name!r} has no output {sorted(unknown)[0]!r}; outputs: "
            + ", ".join(sorted(names))
        )
    return asked or names


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
