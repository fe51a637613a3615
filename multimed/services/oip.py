"""The Open Inference Protocol's view of the catalog, and its tensors on the wire.

Models: every task, named by its id, and every encoder as `encoder_<modality>`. A modality is
one input in its model-ready form (`TensorSpec`: FP32, INT64 token ids for sequences) plus one
BYTES input per raw wire form, named `<modality>_<form>` (`xray_dicom`, `eeg_edf`, `text_text`).
All inputs are optional to the protocol: a request sends one form per modality, and the task's
catalog entry says which modalities it needs. Shapes lead with the batch dimension."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.utils import (
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from multimed.models.catalog import CATALOG, InputForm, OutputKind
from multimed.models.errors import InputError, MultiMedError
from multimed.models.modalities.base import RawInput, TensorSpec

VERSION = "1"  # one version of each model: the bundle being served
ENCODER_PREFIX = "encoder_"
# Raw wire forms as BYTES inputs; per item one element, a series one element per file.
RAW_FORMS = {
    InputForm.TEXT: [1],
    InputForm.IMAGE: [1],
    InputForm.DICOM: [1],
    InputForm.DICOM_SERIES: [-1],
    InputForm.EDF: [1],
    InputForm.SEQUENCE: [1],
    InputForm.GENE_COUNTS: [1],  # a JSON object, gene -> count
}


class ProtocolError(MultiMedError):
    """A request that breaks the protocol or a model's metadata (INVALID_ARGUMENT)."""


class ModelNotFound(MultiMedError):
    """No such model or version (NOT_FOUND)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    dims: tuple[int, ...]  # per item (the batch dimension is not listed)
    modality: str = ""
    form: InputForm | None = None  # None: the model-ready tensor


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str | None  # None: an encoder
    modalities: tuple[str, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def input(self, name: str) -> TensorInfo:
        for t in self.inputs:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.inputs)
        raise ProtocolError(f"model {self.name!r} has no input {name!r}; inputs: {known}")


def encoder_model(modality: str) -> str:
    return f"{ENCODER_PREFIX}{modality}"


def datatype_of(spec: TensorSpec) -> str:
    """The protocol's name for a model-ready tensor's dtype (FP32, INT64)."""
    return np_to_triton_dtype(np.dtype(spec.dtype))


def config_type(datatype: str) -> int:
    """Protocol datatype -> model config's enum (BYTES is TYPE_STRING there)."""
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def modality_inputs(modality: str, spec: TensorSpec) -> list[TensorInfo]:
    inputs = [TensorInfo(modality, datatype_of(spec), spec.shape, modality)]
    for form in sorted(CATALOG.modality(modality).forms):
        if form in RAW_FORMS:
            inputs.append(
                TensorInfo(f"{modality}_{form}", "BYTES", tuple(RAW_FORMS[form]), modality, form)
            )
    return inputs


def build_models(specs: dict[str, TensorSpec], embed_dim: int) -> dict[str, ModelSpec]:
    """Every task and every encoder, from the catalog and the served bundle's tensor specs."""
    models: dict[str, ModelSpec] = {}
    for task in CATALOG.tasks.values():
        per_token = task.output is OutputKind.PER_TOKEN
        outputs = (
            TensorInfo(
                "scores", "FP32", (-1, len(task.labels)) if per_token else (len(task.labels),)
            ),
            TensorInfo("labels", "BYTES", (-1,)),
        )
        inputs = [t for m in task.accepted for t in modality_inputs(m, specs[m])]
        models[task.id] = ModelSpec(task.id, task.id, task.accepted, tuple(inputs), outputs)
    for m, spec in specs.items():
        outputs = [TensorInfo("embedding", "FP32", (embed_dim,))]
        if CATALOG.modality(m).emits_tokens:
            outputs.append(TensorInfo("tokens", "FP32", (-1, embed_dim)))
        name = encoder_model(m)
        models[name] = ModelSpec(name, None, (m,), tuple(modality_inputs(m, spec)), tuple(outputs))
    return models


# --- metadata and configuration ---


def metadata(model: ModelSpec) -> oip.ModelMetadataResponse:
    def tensor(t: TensorInfo):
        return oip.ModelMetadataResponse.TensorMetadata(
            name=t.name, datatype=t.datatype, shape=[-1, *t.dims]
        )

    return oip.ModelMetadataResponse(
        name=model.name,
        versions=[VERSION],
        platform="multimed",
        inputs=[tensor(t) for t in model.inputs],
        outputs=[tensor(t) for t in model.outputs],
    )


def config(model: ModelSpec, max_batch_size: int) -> mc.ModelConfig:
    """As Triton states it: dims without the batch dimension; every input optional (one form
    per modality is sent); batching is dynamic (requests are coalesced with no fixed wait)."""
    parameters = {}
    if model.task is not None:  # its catalog entry: required modalities, labels, metric
        entry = next(t for t in CATALOG.to_json()["tasks"] if t["id"] == model.task)
        parameters["task"] = mc.ModelParameter(string_value=json.dumps(entry))
    return mc.ModelConfig(
        name=model.name,
        platform="multimed",
        backend="multimed",
        max_batch_size=max_batch_size,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        input=[
            mc.ModelInput(
                name=t.name, data_type=config_type(t.datatype), dims=t.dims, optional=True
            )
            for t in model.inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=config_type(t.datatype), dims=t.dims)
            for t in model.outputs
        ],
        dynamic_batching=mc.ModelDynamicBatching(),
        parameters=parameters,
    )


# --- tensors ---


def read_input(
    tensor: oip.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    info: TensorInfo,
    max_batch_size: int,
) -> np.ndarray:
    """One request input -> array [B, ...] (BYTES: an object array of bytes), checked against
    the model's metadata."""
    name = tensor.name
    if tensor.datatype != info.datatype:
        raise ProtocolError(
            f"input {name!r} has datatype {tensor.datatype or 'unset'}, expected {info.datatype}"
        )
    shape = tuple(tensor.shape)
    want = [-1, *info.dims]
    if len(shape) != len(want) or any(w not in (-1, s) for w, s in zip(want, shape, strict=True)):
        raise ProtocolError(f"input {name!r} has shape {list(shape)}, expected {want}")
    if any(s < 0 for s in shape):
        raise ProtocolError(f"input {name!r} has a negative dimension: {list(shape)}")
    if not 1 <= shape[0] <= max_batch_size:
        raise ProtocolError(
            f"input {name!r} has batch size {shape[0]}; this model takes 1..{max_batch_size}"
        )
    count = int(np.prod(shape))
    if info.datatype == "BYTES":
        if raw is None:
            items = list(tensor.contents.bytes_contents)
        else:
            try:
                items = list(deserialize_bytes_tensor(raw))
            except struct.error:
                raise ProtocolError(
                    f"input {name!r}: malformed BYTES data (each element: a 4-byte "
                    "little-endian length, then that many bytes)"
                ) from None
        if len(items) != count:
            raise ProtocolError(
                f"input {name!r} of shape {list(shape)} needs {count} BYTES elements, "
                f"got {len(items)}"
            )
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = np.dtype(triton_to_np_dtype(info.datatype)).newbyteorder("<")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(
                f"input {name!r} of shape {list(shape)} and {info.datatype} needs "
                f"{count * dtype.itemsize} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    values = {"FP32": tensor.contents.fp32_contents, "INT64": tensor.contents.int64_contents}
    array = np.asarray(values[info.datatype], dtype=dtype)
    if array.size != count:
        raise ProtocolError(
            f"input {name!r} of shape {list(shape)} needs {count} values, got {array.size}"
        )
    return array.reshape(shape)


def item_input(info: TensorInfo, value: np.ndarray | bytes) -> RawInput:
    """One batch item of one input -> the internal input it carries."""
    if info.form is None:
        return RawInput(info.modality, InputForm.PREPROCESSED, value)
    items = [bytes(b) for b in np.atleast_1d(value)]
    if info.form == InputForm.DICOM_SERIES:
        return RawInput(info.modality, info.form, [b for b in items if b])  # "" pads a batch
    data = items[0]
    try:
        if info.form == InputForm.SEQUENCE:
            data = data.decode("utf-8")
        elif info.form == InputForm.GENE_COUNTS:
            data = json.loads(data)
    except ValueError as e:  # bad UTF-8 or JSON
        raise InputError(info.modality, f"input {info.name!r} is not valid: {e}") from None
    return RawInput(info.modality, info.form, data)


def output_tensor(
    name: str, datatype: str, array: np.ndarray
) -> tuple[oip.ModelInferResponse.InferOutputTensor, bytes]:
    if datatype == "BYTES":
        # One bytes object holding the length-prefixed elements (an empty array for none).
        raw = serialize_byte_tensor(array).item() if array.size else b""
    else:
        dtype = np.dtype(triton_to_np_dtype(datatype)).newbyteorder("<")
        raw = np.ascontiguousarray(array, dtype=dtype).tobytes()
    tensor = oip.ModelInferResponse.InferOutputTensor(
        name=name, datatype=datatype, shape=list(array.shape)
    )
    return tensor, raw


def pad_stack(rows: list[np.ndarray], fill) -> np.ndarray:
    """Stack arrays whose first dimension differs, padding with `fill` (BYTES: b"")."""
    longest = max((r.shape[0] for r in rows), default=0)
    first = rows[0]
    out = np.full((len(rows), longest, *first.shape[1:]), fill, dtype=first.dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
