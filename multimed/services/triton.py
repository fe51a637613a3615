"""The Triton view of an encoder, defined once: its signature (the model-ready input tensor and
its outputs) and the one `ModelConfig` builder. The Open Inference Protocol front door, `multimed
export` and the Triton encoder backend all read it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import np_to_triton_dtype

from multimed.models.catalog import CATALOG, InputForm
from multimed.models.modalities.base import TensorSpec

ENCODER_PREFIX = "encoder_"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str  # the protocol's: FP32, INT64, BYTES
    dims: tuple[int, ...]  # per item (the batch dimension is not listed); -1 where it varies
    modality: str = ""
    form: InputForm | None = None  # None: the model-ready tensor


@dataclass(frozen=True)
class EncoderSignature:
    modality: str
    input: TensorInfo  # the model-ready tensor, named after the modality
    # "embedding" [D], "tokens" [-1, D] for sequences, and "descriptor" [K] (what the OOD score
    # reads besides the embedding; K is the encoder's)
    outputs: tuple[TensorInfo, ...]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def encoder_model(modality: str) -> str:
    return f"{ENCODER_PREFIX}{modality}"


def datatype_of(spec: TensorSpec) -> str:
    """The protocol's name for a model-ready tensor's dtype (FP32, INT64)."""
    return np_to_triton_dtype(np.dtype(spec.dtype))


def encoder_signature(modality: str, spec: TensorSpec, embed_dim: int) -> EncoderSignature:
    outputs = [TensorInfo("embedding", "FP32", (embed_dim,))]
    if CATALOG.modality(modality).emits_tokens:
        outputs.append(TensorInfo("tokens", "FP32", (-1, embed_dim)))
    outputs.append(TensorInfo("descriptor", "FP32", (-1,)))
    model_ready = TensorInfo(modality, datatype_of(spec), spec.shape, modality)
    return EncoderSignature(modality, model_ready, tuple(outputs))


def _config_type(datatype: str) -> int:
    """Protocol datatype -> model config's enum (BYTES is TYPE_STRING there)."""
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def model_config(
    name: str,
    inputs: Sequence[TensorInfo],
    outputs: Sequence[TensorInfo],
    *,
    max_batch_size: int,
    platform: str,
    optional_inputs: bool = False,
    queue_delay_us: int = 0,
    parameters: Mapping[str, str] | None = None,
) -> mc.ModelConfig:
    """A model as Triton states it: dims without the batch dimension, dynamic batching."""
    return mc.ModelConfig(
        name=name,
        platform=platform,
        max_batch_size=max_batch_size,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        input=[
            mc.ModelInput(
                name=t.name,
                data_type=_config_type(t.datatype),
                dims=t.dims,
                optional=optional_inputs,
            )
            for t in inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=_config_type(t.datatype), dims=t.dims)
            for t in outputs
        ],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=queue_delay_us),
        parameters={k: mc.ModelParameter(string_value=v) for k, v in (parameters or {}).items()},
    )
