"""The two protocols' inference calls, and requests serialized once before a run: the load
generator usually shares the machine with the server, and what it spends per request is taken
from the server."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as oip
from tritonclient.utils import serialize_byte_tensor

from multimed.client.sdk import predict_request
from multimed.models.catalog import InputForm
from multimed.models.inputs import RawInput
from multimed.v1 import multimed_pb2 as pb


def _method(module: ModuleType, service: str, method: str) -> str:
    """An RPC's path, read from the generated descriptors rather than typed out."""
    return f"/{module.DESCRIPTOR.services_by_name[service].full_name}/{method}"


def _elements(raw: RawInput) -> list[bytes]:
    """A raw input as the elements of its BYTES tensor (a DICOM series: one per file)."""
    if raw.form == InputForm.DICOM_SERIES:
        return list(raw.data)
    if raw.form == InputForm.GENE_COUNTS:
        return [json.dumps(raw.data).encode()]
    if isinstance(raw.data, str):
        return [raw.data.encode()]
    if isinstance(raw.data, bytes):
        return [raw.data]
    raise ValueError(
        f"{raw.modality}: the Open Inference Protocol takes no {raw.form} input as bytes; "
        "send a file form (DICOM, PNG, EDF, text, sequence or gene counts)"
    )


def oip_request(task: str, inputs: Mapping[str, RawInput]) -> oip.ModelInferRequest:
    """The task is the model; each input goes as its wire form's BYTES tensor, named
    `<modality>_<form>` as the server's model metadata lists it, of shape [1, elements]."""
    request = oip.ModelInferRequest(model_name=task)
    for raw in inputs.values():
        elements = np.empty(len(items := _elements(raw)), dtype=object)
        elements[:] = items
        request.inputs.add(
            name=f"{raw.modality}_{raw.form}", datatype="BYTES", shape=[1, len(items)]
        )
        request.raw_input_contents.append(serialize_byte_tensor(elements).item())
    return request


@dataclass(frozen=True)
class Api:
    """One protocol's inference call."""

    name: str
    method: str  # the RPC's path
    request: Callable[[str, Mapping[str, RawInput]], Message]  # (task, inputs) -> request
    # A request holding only an id. Appended to a serialized request it sets that request's id:
    # protobuf merges concatenated messages and the last value of a field wins.
    request_id: Callable[[str], Message]


MULTIMED = Api(
    "multimed",
    _method(pb, "MultiMed", "Predict"),
    predict_request,
    lambda rid: pb.PredictRequest(request_id=rid),
)
OIP = Api(
    "oip",
    _method(oip, "GRPCInferenceService", "ModelInfer"),
    oip_request,
    lambda rid: oip.ModelInferRequest(id=rid),
)
APIS = {api.name: api for api in (MULTIMED, OIP)}


@dataclass(frozen=True)
class TaskLoad:
    """One task's part of the load: its requests, serialized, and its weight in the mix."""

    task: str
    requests: tuple[bytes, ...]
    weight: int = 1


def prepare(
    api: Api, task: str, inputs: Sequence[Mapping[str, RawInput]], weight: int = 1
) -> TaskLoad:
    if not inputs:
        raise ValueError(f"no inputs for task {task!r}")
    if weight < 1:
        raise ValueError(f"task {task!r}: a weight is a whole number from 1, not {weight}")
    return TaskLoad(task, tuple(api.request(task, i).SerializeToString() for i in inputs), weight)
