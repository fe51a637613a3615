"""The shared path of sequence modalities (DNA, protein): raw or FASTA text -> checked letters ->
token ids, padded per batch with a mask. Each modality sets its alphabet and length limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from multimed.models.data.sequence_io import parse_sequence
from multimed.models.modalities.base import Batch, ModalityPipeline, RawInput, pad_collate


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
