"""`ModalityInput` <-> `RawInput`: one modality's input on the multimed.v1 wire. Shared by the
servicer and the SDK, so it imports neither torch nor ray."""

from __future__ import annotations

import math

import numpy as np

from multimed.models.catalog import CATALOG, InputForm
from multimed.models.errors import InputError
from multimed.models.inputs import RawInput
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
    data = t.data  # each read of a bytes field copies it out of the message: read once
    if len(data) != expected:
        raise InputError(
            modality,
            f"tensor of shape {shape} and {dtype.name} needs {expected} bytes, got {len(data)}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


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
