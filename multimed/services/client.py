"""Client SDK for multimed.v1, sync and asyncio. Inputs are given per modality as a path (a file,
or a directory of DICOM slices), text, or a ready `RawInput`; responses are the protobuf
messages."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import grpc

from multimed.models.catalog import InputForm
from multimed.models.data.inputs import read_input
from multimed.models.modalities.base import RawInput
from multimed.services.convert import input_to_wire
from multimed.v1 import multimed_pb2 as pb
from multimed.v1 import multimed_pb2_grpc as pb_grpc

DEFAULT_URL = "127.0.0.1:8001"
InputValue = RawInput | Path | str


def to_input(modality: str, value: InputValue) -> pb.ModalityInput:
    """A path is read by its file type; a plain string is text (or a sequence); else RawInput."""
    if isinstance(value, RawInput):
        return input_to_wire(value)
    if isinstance(value, Path):
        return input_to_wire(read_input(modality, value))
    form = InputForm.TEXT if modality == "text" else InputForm.SEQUENCE
    return input_to_wire(RawInput(modality, form, value))


def predict_request(
    task: str,
    inputs: Mapping[str, InputValue],
    request_id: str | None = None,
    explain: bool = False,
) -> pb.PredictRequest:
    return pb.PredictRequest(
        request_id=request_id or uuid.uuid4().hex,
        task=task,
        inputs=[to_input(m, v) for m, v in inputs.items()],
        explain=explain,
    )


def _channel_options(max_message_mb: float) -> list[tuple[str, int]]:
    limit = int(max_message_mb * 1024 * 1024)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class MultiMedClient:
    """Blocking client. `with MultiMedClient(url) as c: c.predict(task, {"xray": Path(...)})`."""

    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, max_message_mb: float = 64
    ):
        self.channel = grpc.insecure_channel(url, options=_channel_options(max_message_mb))
        self.stub = pb_grpc.MultiMedStub(self.channel)
        self.metadata = _metadata(token)

    def predict(
        self,
        task: str,
        inputs: Mapping[str, InputValue],
        *,
        request_id=None,
        explain: bool = False,
        timeout: float | None = 60,
    ) -> pb.PredictResponse:
        request = predict_request(task, inputs, request_id, explain)
        return self.stub.Predict(request, timeout=timeout, metadata=self.metadata)

    def predict_stream(self, requests: Iterable[pb.PredictRequest], timeout: float | None = None):
        return self.stub.PredictStream(iter(requests), timeout=timeout, metadata=self.metadata)

    def embed(self, modality: str, value: InputValue, timeout: float | None = 60):
        request = pb.EmbedRequest(request_id=uuid.uuid4().hex, input=to_input(modality, value))
        return self.stub.Embed(request, timeout=timeout, metadata=self.metadata)

    def catalog(self) -> pb.Catalog:
        return self.stub.GetCatalog(pb.GetCatalogRequest(), metadata=self.metadata)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncMultiMedClient:
    """asyncio client: `async with AsyncMultiMedClient(url) as c: await c.predict(...)`."""

    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, max_message_mb: float = 64
    ):
        self.channel = grpc.aio.insecure_channel(url, options=_channel_options(max_message_mb))
        self.stub = pb_grpc.MultiMedStub(self.channel)
        self.metadata = _metadata(token)

    async def predict(
        self,
        task: str,
        inputs: Mapping[str, InputValue],
        *,
        request_id=None,
        explain: bool = False,
        timeout: float | None = 60,
    ) -> pb.PredictResponse:
        request = predict_request(task, inputs, request_id, explain)
        return await self.stub.Predict(request, timeout=timeout, metadata=self.metadata)

    async def predict_stream(
        self, requests: Iterable[pb.PredictRequest], timeout: float | None = None
    ) -> AsyncIterator[pb.PredictResponse]:
        async for response in self.stub.PredictStream(
            iter(requests), timeout=timeout, metadata=self.metadata
        ):
            yield response

    async def embed(self, modality: str, value: InputValue, timeout: float | None = 60):
        request = pb.EmbedRequest(request_id=uuid.uuid4().hex, input=to_input(modality, value))
        return await self.stub.Embed(request, timeout=timeout, metadata=self.metadata)

    async def catalog(self) -> pb.Catalog:
        return await self.stub.GetCatalog(pb.GetCatalogRequest(), metadata=self.metadata)

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
