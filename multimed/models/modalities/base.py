"""The one contract every modality pipeline implements: decode -> preprocess -> collate ->
features -> encode. Construction is cheap (no weights); `setup` is the only slow step.

Shapes: `preprocess` returns one item as a dict of tensors without a batch dimension; `collate`
stacks (or pads) items into a batch dict; the encoder maps a batch dict to an `EncoderOutput`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn

from multimed.models.catalog import CATALOG, InputForm, ModalitySpec
from multimed.models.config import EncoderSize, Frozen, Precision
from multimed.models.errors import InputError
from multimed.models.inputs import RawInput

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class EncoderOutput:
    pooled: Tensor  # [B, D]
    tokens: Tensor | None = None  # [B, L, D] for modalities that emit per-token embeddings
    token_mask: Tensor | None = None  # [B, L] bool, True at real (non-padding) tokens
    # [B, K]: what the out-of-distribution score reads besides `pooled` (trust.Novelty), e.g.
    # each conv stage's activation statistics. Training pulls the embedding toward what the
    # tasks need, so an input unlike any training input can still land among them (pydicom's
    # real MR did); the statistics of earlier layers keep what the embedding discards.
    descriptor: Tensor | None = None


@dataclass(frozen=True)
class TensorSpec:
    """A modality's one model-ready tensor: what the trainable encoder reads once the frozen
    features stage has run. Per item: no batch dimension, -1 where the length varies. It is the
    input of the encoder's exported model and of its Open Inference Protocol tensor input."""

    key: str  # its key in the batch dict
    dtype: str  # numpy name: "float32", or "int64" for token ids
    shape: tuple[int, ...]


class NoSettings(Frozen):
    pass


class ModalityPipeline(ABC):
    """Subclasses set `modality` and `Settings`, and implement decode, preprocess, build_encoder.

    Bad input raises `InputError(self.modality, "what is wrong")` from decode or preprocess.
    """

    modality: ClassVar[str]
    Settings: ClassVar[type[BaseModel]] = NoSettings

    def __init__(
        self,
        settings: Mapping[str, Any] | BaseModel | None = None,
        size: EncoderSize = "tiny",
        embed_dim: int = 128,
    ):
        if isinstance(settings, BaseModel):
            settings = settings.model_dump()
        try:
            self.settings = self.Settings.model_validate(dict(settings or {}))
        except ValidationError as e:
            raise ValueError(f"{self.modality} settings: {e}") from None
        self.size = size
        self.embed_dim = embed_dim
        self.encoder: nn.Module | None = None
        self.device = torch.device("cpu")
        # bf16: the forward pass under autocast (bfloat16 matmuls and convolutions, on GPUs
        # with tensor cores); outputs are float32 either way (`unbatch` callers cast).
        self.precision: Precision = "fp32"

    @property
    def spec(self) -> ModalitySpec:
        return CATALOG.modality(self.modality)

    def error(self, problem: str) -> InputError:
        return InputError(self.modality, problem)

    # --- wire -> tensor (per item, before batching, so one bad item fails alone) ---

    def prepare(self, raw: RawInput) -> Batch:
        """decode + preprocess one input, checking its form first."""
        if raw.form == InputForm.PREPROCESSED:  # every modality takes its model-ready tensor
            return self.from_model_input(raw.data)
        if raw.form not in self.spec.forms:
            forms = ", ".join(sorted(self.spec.forms))
            raise self.error(f"input form {raw.form!s} is not accepted (accepted: {forms})")
        try:
            batch = self.preprocess(self.decode(raw))
        except (RecursionError, MemoryError) as e:  # a codec choked on this input's structure
            raise self.error(f"input could not be decoded ({type(e).__name__})") from None
        # The one check behind every decoder: a NaN or Inf here (a file's scaling attribute, a
        # float32 overflow) would otherwise come back as a confident-looking NaN answer.
        for key, tensor in batch.items():
            if tensor.is_floating_point() and not _all_finite(tensor):
                raise self.error(f"{key!r} contains NaN or Inf after decoding the input")
        return batch

    @abstractmethod
    def decode(self, raw: RawInput) -> Any:
        """Wire form -> decoded domain object (see each modality for its type)."""

    @abstractmethod
    def preprocess(self, decoded: Any) -> Batch:
        """Decoded object -> model-ready tensors for one item (no batch dimension)."""

    def collate(self, items: Sequence[Batch]) -> Batch:
        """Items -> batch. Default stacks each key; variable-length modalities pad instead."""
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    # --- the model-ready tensor (see TensorSpec) ---

    @abstractmethod
    def model_input(self) -> TensorSpec:
        """The encoder's one input tensor after `features`, per item."""

    def from_model_input(self, data: Any) -> Batch:
        """One item's model-ready tensor (no batch dimension) -> checked batch item, as
        `features(preprocess(...))` would give it. Floats must be finite and of the exact shape."""
        spec = self.model_input()
        array = np.asarray(data)
        if array.dtype != np.dtype(spec.dtype):
            raise self.error(f"model-ready tensor must be {spec.dtype}, got {array.dtype}")
        if len(array.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
        ):
            raise self.error(
                f"model-ready tensor must have shape {list(spec.shape)} (per item), "
                f"got {list(array.shape)}"
            )
        if array.dtype.kind == "f":
            check_finite(self, array, "tensor")
        return {spec.key: torch.from_numpy(np.array(array))}

    def model_tensor(self, batch: Batch) -> Tensor:
        """A featurised batch -> its one model-ready tensor [B, ...]."""
        return batch[self.model_input().key]

    def model_batch(self, tensor: Tensor) -> Batch:
        """The inverse of `model_tensor`: what the encoder reads (traceable, for export)."""
        return {self.model_input().key: tensor}

    # --- model ---

    @abstractmethod
    def build_encoder(self) -> nn.Module:
        """A freshly initialised trainable encoder: forward(batch: Batch) -> EncoderOutput."""

    def features(self, batch: Batch) -> Batch:
        """Frozen, deterministic stage run before the trainable encoder (e.g. a pretrained
        backbone). Identity by default. Training runs it once and caches the result."""
        return batch

    def setup(self, device: str | torch.device = "cpu", state: Mapping[str, Tensor] | None = None):
        """Build the encoder, load weights and move to device. The only slow step."""
        self.device = torch.device(device)
        encoder = self.build_encoder()
        if state is not None:
            encoder.load_state_dict(dict(state))
        self.encoder = encoder.to(self.device).eval()
        return self

    @torch.inference_mode()
    def forward(self, batch: Batch) -> EncoderOutput:
        if self.encoder is None:
            raise RuntimeError(f"{self.modality} pipeline used before setup()")
        cuda = self.device.type == "cuda"
        # Pinned host memory lets the copy to the GPU run asynchronously (non_blocking).
        batch = {
            k: (v.pin_memory() if cuda else v).to(self.device, non_blocking=True)
            for k, v in batch.items()
        }
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        ):
            out = self.encoder(self.featurise(batch))
        return EncoderOutput(
            out.pooled.float(),
            None if out.tokens is None else out.tokens.float(),
            out.token_mask,
            out.descriptor.float(),
        )

    def featurise(self, batch: Batch) -> Batch:
        """The features stage, unless the batch is model-ready already (`from_model_input`)."""
        return batch if self.model_input().key in batch else self.features(batch)

    def encode(self, raws: Sequence[RawInput]) -> EncoderOutput:
        """Convenience for scripts and tests: prepare, collate and forward."""
        return self.forward(self.collate([self.prepare(r) for r in raws]))

    @staticmethod
    def unbatch(out: EncoderOutput) -> list[EncoderOutput]:
        """Batch output -> one output per item (padding stripped from token outputs)."""
        items = []
        for i in range(out.pooled.shape[0]):
            tokens = mask = None
            if out.tokens is not None:
                keep = out.token_mask[i]
                tokens = out.tokens[i][keep].unsqueeze(0)
                mask = keep[keep].unsqueeze(0)
            items.append(
                EncoderOutput(out.pooled[i : i + 1], tokens, mask, out.descriptor[i : i + 1])
            )
        return items


# --- helpers shared by several pipelines ---


def channel_stats(activation: Tensor) -> Tensor:
    """[B, C, ...] -> [B, 2C]: each channel's mean and standard deviation over the rest (an
    encoder's descriptor: the statistics of a stage, as batch norm sees them). Two passes, the
    mean then the centred squares: torch's `std` over a dimension took 7x as long on CPU (23 vs
    3.3 ms for an X-ray batch of 32's four stages, one thread; it was half the encoder's
    forward), and E[x^2] - E[x]^2 loses precision where the mean dwarfs the spread."""
    flat = activation.flatten(2)
    mean = flat.mean(-1)
    var = (flat - mean.unsqueeze(-1)).square_().sum(-1) / (flat.shape[-1] - 1)
    return torch.cat([mean, var.sqrt()], 1)


def stages_descriptor(stats: list[Tensor]) -> Tensor | None:
    """Each stage's `channel_stats` side by side; None in training, which does not take them."""
    return torch.cat(stats, 1) if stats else None


def _all_finite(tensor: torch.Tensor) -> bool:
    """numpy's check on a CPU tensor's memory: torch.isfinite(t).all() took 0.8 ms for a
    16x128x128 volume on one thread, numpy's 0.03 ms (measured; preprocessing is CPU)."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


def check_finite(pipeline: ModalityPipeline, array: np.ndarray, what: str = "input") -> None:
    if not np.isfinite(array).all():
        raise pipeline.error(f"{what} contains NaN or Inf values")


def as_float_array(pipeline: ModalityPipeline, data: Any, ndim: tuple[int, ...]) -> np.ndarray:
    """Validate a TENSOR-form payload: numeric, finite, of an allowed dimensionality."""
    array = np.asarray(data)
    if array.dtype.kind not in "fiu":
        raise pipeline.error(f"tensor dtype {array.dtype} is not numeric")
    if array.ndim not in ndim:
        allowed = " or ".join(f"{n}-D" for n in ndim)
        raise pipeline.error(f"tensor must be {allowed}, got shape {tuple(array.shape)}")
    with np.errstate(over="ignore"):  # values past float32's range become Inf, refused below
        array = array.astype(np.float32, copy=False)
    check_finite(pipeline, array, "tensor")
    return array


def pad_collate(items: Sequence[Batch], key: str, pad_value: float | int = 0) -> Batch:
    """Pad a variable-length key (first dim of each item's tensor = length) and add `mask`."""
    lengths = [it[key].shape[0] for it in items]
    longest = max(lengths)
    first = items[0][key]
    out = first.new_full((len(items), longest, *first.shape[1:]), pad_value)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, it in enumerate(items):
        out[i, : lengths[i]] = it[key]
        mask[i, : lengths[i]] = True
    return {key: out, "mask": mask}


def width(size: EncoderSize, tiny: int, base: int) -> int:
    return tiny if size == "tiny" else base
