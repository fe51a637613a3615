"""The shared path of sequence modalities (DNA, protein): raw or FASTA text -> checked letters ->
token ids, padded per batch with a mask. Each modality sets its alphabet and length limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from multimed.models.codecs.sequence import parse_sequence
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import (
    Batch,
    ModalityPipeline,
    TensorSpec,
    pad_collate,
)


class SequencePipeline(ModalityPipeline):
    """Decoded type: `str`, upper-case over `alphabet`. Token ids index the alphabet; the
    padding id is len(alphabet). Settings must define min_length and max_length."""

    alphabet: ClassVar[str]

    @classmethod
    def pad_id(cls) -> int:
        return len(cls.alphabet)

    def decode(self, raw: RawInput) -> str:
        s = self.settings
        return parse_sequence(
            raw.data,
            self.modality,
            self.alphabet,
            min_length=s.min_length,
            max_length=s.max_length,
        )

    def preprocess(self, decoded: str) -> Batch:
        return {"tokens": torch.tensor([self.alphabet.index(c) for c in decoded], dtype=torch.long)}

    def collate(self, items: Sequence[Batch]) -> Batch:
        return pad_collate(items, "tokens", pad_value=self.pad_id())

    def model_input(self) -> TensorSpec:
        return TensorSpec("tokens", "int64", (-1,))

    def from_model_input(self, data: Any) -> Batch:
        """Token ids (alphabet positions); trailing padding ids are stripped, so rows of a
        padded batch are accepted as they are."""
        tokens = super().from_model_input(data)["tokens"]
        pad = self.pad_id()
        length = int((tokens != pad).nonzero().max()) + 1 if (tokens != pad).any() else 0
        tokens = tokens[:length]
        if ((tokens < 0) | (tokens >= pad)).any():
            raise self.error(f"token ids must lie in 0..{pad - 1} (padding {pad} only at the end)")
        s = self.settings
        if not s.min_length <= length <= s.max_length:
            raise self.error(
                f"sequence has {length} tokens; allowed {s.min_length}..{s.max_length}"
            )
        return {"tokens": tokens}

    def model_batch(self, tensor: torch.Tensor) -> Batch:
        return {"tokens": tensor, "mask": tensor != self.pad_id()}
