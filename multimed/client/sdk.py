"""Client SDK for multimed.v1, sync and asyncio. Inputs are given per modality as a path (a file,
or a directory of DICOM slices), text or a sequence, or a ready `RawInput`; responses are the
protobuf messages. Both clients build requests the same way (`_Calls`): the sync one returns
answers, the asyncio one awaitables."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from multimed.client.channel import DEFAULT_URL, ChannelSettings
from multimed.client.files import read_input, string_input
from multimed.models.inputs import RawInput
from multimed.services.frontends.multimed_v1.inputs import input_to_wire
from multimed.v1 import multimed_pb2 as pb
from multimed.v1 import multimed_pb2_grpc as pb_grpc

InputValue = RawInput | Path | str


def to_input(modality: str, value: InputValue) -> pb.ModalityInput:
    """A path is read by its file type; a plain string is the modality's text or sequence."""
    if isinstance(value, RawInput):
        return input_to_wire(value)
    if isinstance(value, Path):
        return input_to_wire(read_input(modality, value))
    return input_to_wire(string_input(modality, value))


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


class _Calls:
    """The methods of both clients; each returns what the channel's stub returns. TLS:
    `tls_ca=` (and `tls_cert=`, `tls_key=` for mTLS), or `tls=True` for the system's CAs.
    Calls but PredictStream are retried on UNAVAILABLE (see `channel.RETRY_POLICY`) unless
    `retries=False`."""

    open_channel = ChannelSettings.channel  # the asyncio client opens an aio channel

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        max_message_mb: float = 64,
        retries: bool = True,
    ):
        settings = ChannelSettings(
            url, token, tls, tls_ca, tls_cert, tls_key, max_message_mb, retries
        )
        self.channel = type(self).open_channel(settings)
        self.stub = pb_grpc.MultiMedStub(self.channel)
        self.hospital = pb_grpc.HospitalStub(self.channel)
        self.metadata = settings.metadata()

    def predict(
        self,
        task: str,
        inputs: Mapping[str, InputValue],
        *,
        request_id: str | None = None,
        explain: bool = False,
        timeout: float | None = 60,
    ):
        """-> PredictResponse. `explain`: per-modality contributions."""
        request = predict_request(task, inputs, request_id, explain)
        return self.stub.Predict(request, timeout=timeout, metadata=self.metadata)

    def predict_study(
        self,
        pacs: str,
        study_uid: str,
        tasks: Iterable[str] = (),
        inputs: Mapping[str, InputValue] | None = None,
        *,
        store_sr: bool = False,
        request_id: str | None = None,
        timeout: float | None = 300,
    ):
        """-> PredictStudyResponse: every task (or those named) the study in the server's
        configured PACS `pacs` can answer; `inputs` ride along (a note, a question, an EEG)."""
        request = pb.PredictStudyRequest(
            request_id=request_id or uuid.uuid4().hex,
            pacs=pacs,
            study_instance_uid=study_uid,
            tasks=list(tasks),
            inputs=[to_input(m, v) for m, v in (inputs or {}).items()],
            store_sr=store_sr,
        )
        return self.hospital.PredictStudy(request, timeout=timeout, metadata=self.metadata)

    def predict_stream(self, requests: Iterable[pb.PredictRequest], timeout: float | None = None):
        """-> PredictResponses as they are ready, matched by request_id."""
        return self.stub.PredictStream(iter(requests), timeout=timeout, metadata=self.metadata)

    def embed(self, modality: str, value: InputValue, timeout: float | None = 60):
        """-> EmbedResponse: the encoder's output for one input."""
        request = pb.EmbedRequest(request_id=uuid.uuid4().hex, input=to_input(modality, value))
        return self.stub.Embed(request, timeout=timeout, metadata=self.metadata)

    def catalog(self, timeout: float | None = 30):
        return self.stub.GetCatalog(pb.GetCatalogRequest(), timeout=timeout, metadata=self.metadata)

    def model_info(self, timeout: float | None = 30):
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata
        )

    def close(self):
        return self.channel.close()


class MultiMedClient(_Calls):
    """Blocking client. `with MultiMedClient(url) as c: c.predict(task, {"xray": Path(...)})`."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncMultiMedClient(_Calls):
    """asyncio client: `async with AsyncMultiMedClient(url) as c: await c.predict(...)`;
    `async for r in c.predict_stream(requests)`."""

    open_channel = ChannelSettings.aio_channel

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
