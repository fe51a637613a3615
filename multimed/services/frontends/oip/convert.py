"""Open Inference Protocol wire messages <-> the internal types: `request_from_wire` checks a
ModelInferRequest against its model and yields per batch item its `RawInput`s; `response_to_wire`
builds the ModelInferResponse from output arrays."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2 as oip
from tritonclient.utils import serialize_byte_tensor, triton_to_np_dtype

from multimed.models.catalog import InputForm
from multimed.models.errors import InputError, MissingModality, shown
from multimed.models.inputs import RawInput
from multimed.services.errors import ProtocolError
from multimed.services.frontends.oip.models import VERSION, ModelSpec
from multimed.services.triton import TensorInfo

# BYTES elements in one input: a full batch of the longest DICOM series a request may carry
# (each element is decoded in Python, so the count bounds the work before it starts).
MAX_BYTES_ELEMENTS = 65536


@dataclass(frozen=True)
class Decoded:
    """A ModelInfer request checked against its model."""

    batch: int
    items: list[list[RawInput]]  # per batch item, its inputs
    carriers: dict[str, str]  # modality -> the input that carried it (for error messages)
    outputs: list[TensorInfo]  # the outputs asked for (all, when none were named)

    def located(self, error: BaseException, item: int) -> BaseException:
        """An input's error, told which tensor (and batch item) it came from."""
        if isinstance(error, InputError) and error.modality in self.carriers:
            where = f"input {self.carriers[error.modality]!r}"
            if self.batch > 1:
                where += f", item {item}"
            return InputError(error.modality, f"{error.problem} ({where})")
        return error


def request_from_wire(
    model: ModelSpec, request: oip.ModelInferRequest, max_batch_size: int
) -> Decoded:
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(raws)} entries for {len(request.inputs)} inputs"
        )
    carriers: dict[str, str] = {}
    arrays: list[tuple[TensorInfo, np.ndarray]] = []
    for i, tensor in enumerate(request.inputs):
        info = model.input(tensor.name)
        if info.modality in carriers:
            raise ProtocolError(
                f"inputs {carriers[info.modality]!r} and {info.name!r} both carry "
                f"{info.modality}; send one form per modality"
            )
        array = read_input(tensor, raws[i] if raws else None, info, max_batch_size)
        if arrays and array.shape[0] != arrays[0][1].shape[0]:
            first = arrays[0][0].name
            raise ProtocolError(
                f"input {info.name!r} has batch size {array.shape[0]}, but {first!r} has "
                f"{arrays[0][1].shape[0]}"
            )
        carriers[info.modality] = info.name
        arrays.append((info, array))
    outputs = _requested(model, request)
    if model.task is None and not arrays:
        raise ProtocolError(
            f"model {model.name!r} needs one input of: {model.alternatives(model.modalities[0])}"
        )
    if model.task is not None:
        try:
            model.task.check_modalities(carriers)
        except MissingModality as e:
            missing = [m for m in model.modalities if m not in carriers]
            wanted = "; ".join(f"{m}: {model.alternatives(m)}" for m in missing)
            raise ProtocolError(f"{e} (inputs for {wanted})") from None
    batch = arrays[0][1].shape[0] if arrays else 0
    decoded = Decoded(batch, [], carriers, outputs)
    for b in range(batch):
        row = []
        for info, array in arrays:
            try:
                row.append(item_input(info, array[b]))
            except InputError as e:
                raise decoded.located(e, b) from None
        decoded.items.append(row)
    return decoded


def _requested(model: ModelSpec, request: oip.ModelInferRequest) -> list[TensorInfo]:
    asked = {o.name for o in request.outputs}
    names = {o.name for o in model.outputs}
    unknown = asked - names
    if unknown:
        raise ProtocolError(
            f"model {model.name!r} has no output {shown(sorted(unknown)[0])}; outputs: "
            + ", ".join(sorted(names))
        )
    return [o for o in model.outputs if not asked or o.name in asked]


def response_to_wire(
    model: ModelSpec, request_id: str, outputs: list[TensorInfo], arrays: dict[str, np.ndarray]
) -> oip.ModelInferResponse:
    response = oip.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request_id)
    for info in outputs:
        tensor, raw = output_tensor(info.name, info.datatype, arrays[info.name])
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
    return response


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
    count = math.prod(shape)  # Python ints: a crafted shape cannot overflow
    if info.datatype == "BYTES":
        if count > MAX_BYTES_ELEMENTS:
            raise ProtocolError(
                f"input {name!r} has {count} BYTES elements; at most {MAX_BYTES_ELEMENTS}"
            )
        if raw is None:
            items = list(tensor.contents.bytes_contents)
        else:
            items = bytes_elements(raw, count, name)
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


def bytes_elements(raw: bytes, count: int, name: str) -> list[bytes]:
    """A raw BYTES tensor (each element: a 4-byte little-endian length, then that many bytes) ->
    its `count` elements. Reads no further than `count`, so a body of millions of empty elements
    costs nothing more than a body of `count`."""
    items, offset, size = [], 0, len(raw)
    while offset < size and len(items) < count:
        if offset + 4 > size:
            break
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > size:
            break
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count or offset != size:
        raise ProtocolError(
            f"input {name!r} needs {count} BYTES elements (each: a 4-byte little-endian length, "
            f"then that many bytes) filling its {size} bytes exactly"
        )
    return items


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
    except RecursionError:  # JSON nested deeper than the parser's stack
        raise InputError(info.modality, f"input {info.name!r} is nested too deeply") from None
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
