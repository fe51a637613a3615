"""Conversion at the edge: multimed.v1 wire messages <-> the internal, protocol-free types."""

from __future__ import annotations

import json
import math

import numpy as np

from multimed.models.catalog import CATALOG, InputForm, OutputKind
from multimed.models.errors import InputError
from multimed.models.modalities.base import RawInput
from multimed.services.types import Embedding, PredictResult
from multimed.v1 import multimed_pb2 as pb

DTYPES = {
    pb.DATA_TYPE_FLOAT32: np.float32,
    pb.DATA_TYPE_FLOAT64: np.float64,
    pb.DATA_TYPE_INT32: np.int32,
    pb.DATA_TYPE_INT64: np.int64,
    pb.DATA_TYPE_UINT8: np.uint8,
    pb.DATA_TYPE_UINT16: np.uint16,
}
WIRE_DTYPE = {np.dtype(v): k for k, v in DTYPES.items()}
OUTPUT_KINDS = {
    OutputKind.SINGLE_LABEL: pb.OUTPUT_KIND_SINGLE_LABEL,
    OutputKind.MULTI_LABEL: pb.OUTPUT_KIND_MULTI_LABEL,
    OutputKind.REGRESSION: pb.OUTPUT_KIND_REGRESSION,
    OutputKind.PER_TOKEN: pb.OUTPUT_KIND_PER_TOKEN_LABELS,
    OutputKind.ANSWER: pb.OUTPUT_KIND_ANSWER,
}
# The oneof field that carries each input form.
FORM_FIELDS = {
    "text": InputForm.TEXT,
    "image": InputForm.IMAGE,
    "dicom": InputForm.DICOM,
    "dicom_series": InputForm.DICOM_SERIES,
    "edf": InputForm.EDF,
    "sequence": InputForm.SEQUENCE,
    "gene_counts": InputForm.GENE_COUNTS,
    "tensor": InputForm.TENSOR,
}
FIELD_OF_FORM = {form: name for name, form in FORM_FIELDS.items()}
MAX_TENSOR_DIMS = 8


def tensor_from_wire(t: pb.Tensor, modality: str) -> np.ndarray:
    if t.dtype not in DTYPES:
        raise InputError(modality, "tensor dtype is unspecified or unsupported")
    dtype = np.dtype(DTYPES[t.dtype]).newbyteorder("<")
    shape = tuple(t.shape)
    if len(shape) > MAX_TENSOR_DIMS or any(d < 0 for d in shape):
        raise InputError(modality, f"tensor shape {shape} is not a valid array shape")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(t.data) != expected:
        raise InputError(
            modality,
            f"tensor of shape {shape} and {dtype.name} needs {expected} bytes, got {len(t.data)}",
        )
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def tensor_to_wire(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array)
    wire = WIRE_DTYPE.get(array.dtype.newbyteorder("="))
    if wire is None:
        supported = ", ".join(sorted(d.name for d in WIRE_DTYPE))
        raise ValueError(f"tensor dtype {array.dtype.name} cannot be sent (use {supported})")
    little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return pb.Tensor(dtype=wire, shape=list(array.shape), data=little_endian.tobytes())


def input_from_wire(item: pb.ModalityInput) -> RawInput:
    modality = item.modality
    CATALOG.modality(modality)  # UnknownModality names the known ones
    which = item.WhichOneof("data")
    if which is None:
        raise InputError(modality, "input carries no data")
    form = FORM_FIELDS[which]
    value = getattr(item, which)
    if form == InputForm.DICOM_SERIES:
        value = list(value.files)
    elif form == InputForm.GENE_COUNTS:
        value = dict(value.counts)
    elif form == InputForm.TENSOR:
        value = tensor_from_wire(value, modality)
    return RawInput(modality, form, value)


def input_to_wire(raw: RawInput) -> pb.ModalityInput:
    field = FIELD_OF_FORM[InputForm(raw.form)]
    item = pb.ModalityInput(modality=raw.modality)
    if raw.form == InputForm.DICOM_SERIES:
        item.dicom_series.files.extend(raw.data)
    elif raw.form == InputForm.GENE_COUNTS:
        item.gene_counts.counts.update(raw.data)
    elif raw.form == InputForm.TENSOR:
        item.tensor.CopyFrom(tensor_to_wire(np.asarray(raw.data)))
    else:
        setattr(item, field, raw.data)
    return item


def result_to_wire(result: PredictResult, server_ms: float) -> pb.PredictResponse:
    p = result.prediction
    response = pb.PredictResponse(
        request_id=result.request_id,
        task=result.task,
        output_kind=OUTPUT_KINDS[p.kind],
        modalities_used=result.used,
        modalities_missing=result.missing,
        contributions=result.contributions,
        bundle_version=result.bundle_version,
        timing=pb.Timing(server_ms=server_ms, encode_ms=result.encode_ms, fuse_ms=result.fuse_ms),
    )
    if p.kind is OutputKind.PER_TOKEN:
        for position, (label, scores) in enumerate(zip(p.predicted, p.scores, strict=True)):
            response.tokens.append(
                pb.TokenPrediction(
                    position=position,
                    label=label,
                    scores=[
                        pb.LabelScore(label=n, score=s)
                        for n, s in zip(p.labels, scores, strict=True)
                    ],
                )
            )
    else:
        response.scores.extend(
            pb.LabelScore(label=n, score=s) for n, s in zip(p.labels, p.scores, strict=True)
        )
        response.predicted.extend(p.predicted)
    return response


def embedding_to_wire(request_id: str, modality: str, e: Embedding, version: str):
    response = pb.EmbedResponse(
        request_id=request_id,
        modality=modality,
        embedding=tensor_to_wire(e.pooled),
        bundle_version=version,
    )
    if e.tokens is not None:
        response.token_embeddings.CopyFrom(tensor_to_wire(e.tokens))
    return response


def catalog_to_wire() -> pb.Catalog:
    doc = pb.Catalog(catalog_version=CATALOG.to_json()["catalog_version"])
    for m in CATALOG.modalities.values():
        doc.modalities.append(
            pb.ModalityInfo(
                id=m.id,
                description=m.description,
                forms=sorted(m.forms),
                emits_tokens=m.emits_tokens,
            )
        )
    for t in CATALOG.tasks.values():
        doc.tasks.append(
            pb.TaskInfo(
                id=t.id,
                description=t.description,
                all_of=t.all_of,
                any_of=t.any_of,
                optional=t.optional,
                output_kind=OUTPUT_KINDS[t.output],
                labels=t.labels,
                metric=t.metric,
            )
        )
    return doc


def model_info_to_wire(manifest: dict) -> pb.ModelInfo:
    config = manifest["config"]
    return pb.ModelInfo(
        bundle_version=manifest["version"],
        catalog_version=manifest["catalog_version"],
        fusion=config["fusion"],
        encoder_size=config["size"],
        embed_dim=config["embed_dim"],
        encoder_versions={
            f.split("/")[1].removesuffix(".safetensors"): digest
            for f, digest in manifest["files"].items()
            if f.startswith("encoders/")
        },
        training_json=json.dumps(
            {"training": manifest.get("training"), "metrics": manifest.get("metrics")}
        ),
    )
