"""Single-cell RNA-seq counts -> embedding with an MLP over a fixed gene panel."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real

import numpy as np
import torch
from pydantic import Field
from torch import nn

from multimed.models.catalog import PBMC_GENES, InputForm
from multimed.models.codecs.types import GeneCounts
from multimed.models.config import Frozen
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import (
    Batch,
    EncoderOutput,
    ModalityPipeline,
    TensorSpec,
    as_float_array,
    check_finite,
    width,
)

_SHOWN = 5  # how many unknown genes an error names
# Entries a gene -> count map may hold: a whole transcriptome is ~60,000 genes (GENCODE), so a
# larger map is no cell's profile. The encoder reads its panel (765 PBMC genes by default).
MAX_GENES = 100_000


class ScrnaSettings(Frozen):
    genes: tuple[str, ...] = Field(PBMC_GENES, min_length=1)
    target_sum: float = Field(1e4, gt=0)
    max_unknown_fraction: float = Field(0.5, ge=0, le=1)


class ScrnaEncoder(nn.Module):
    def __init__(self, genes: int, hidden: int, embed_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(genes, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, embed_dim),
        )

    def forward(self, batch: Batch) -> EncoderOutput:
        # The first layer before its norm keeps how much a profile expresses, not only its shape.
        first = self.mlp[0](batch["expression"])
        return EncoderOutput(self.mlp[1:](first), descriptor=first)


class ScrnaPipeline(ModalityPipeline):
    """Decoded type: `GeneCounts` (raw counts in the settings' gene order)."""

    modality = "scrna"
    Settings = ScrnaSettings

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gene_index = {gene: i for i, gene in enumerate(self.settings.genes)}

    def decode(self, raw: RawInput) -> GeneCounts:
        if raw.form == InputForm.TENSOR:
            counts = as_float_array(self, raw.data, ndim=(1,))
            if counts.shape[0] != len(self.settings.genes):
                raise self.error(
                    f"tensor must hold {len(self.settings.genes)} gene counts "
                    f"(one per gene, in the encoder's order), got {counts.shape[0]}"
                )
            counts, unknown = self._non_negative(counts), ()
        else:
            counts, unknown = self._align(raw.data)
        if not counts.any():
            raise self.error("all counts for the encoder's genes are zero")
        return GeneCounts(counts, unknown)

    def _align(self, data: object) -> tuple[np.ndarray, tuple[str, ...]]:
        """Gene -> count map -> counts in the encoder's gene order, plus the unknown genes. The
        map arrives as decoded JSON, so anything may be in it: its shape is checked first."""
        if not isinstance(data, Mapping) or not data:
            got = "an empty one" if isinstance(data, Mapping) else type(data).__name__
            raise self.error(f"gene counts must be a non-empty {{gene: count}} map, got {got}")
        if len(data) > MAX_GENES:
            raise self.error(f"gene count map has {len(data)} entries, over the {MAX_GENES} limit")
        if not all(isinstance(gene, str) for gene in data):
            raise self.error("gene names must be strings")
        # bool is an int subclass, and JSON true is no count.
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in data.values()):
            raise self.error("gene counts must be numbers")
        try:
            values = np.array(list(data.values()), dtype=np.float64)
        except OverflowError:  # an int too large for a float
            raise self.error("gene counts must be finite numbers") from None
        with np.errstate(over="ignore"):  # past float32's range -> Inf, refused just below
            values = values.astype(np.float32)
        check_finite(self, values, "gene counts")
        self._non_negative(values)
        unknown = sorted(g for g in data if g not in self._gene_index)
        if len(unknown) > self.settings.max_unknown_fraction * len(data):
            shown = ", ".join(unknown[:_SHOWN]) + (", ..." if len(unknown) > _SHOWN else "")
            raise self.error(
                f"{len(unknown)} of {len(data)} genes are not in the encoder's gene panel "
                f"(e.g. {shown}); is this the right species / gene naming?"
            )
        counts = np.zeros(len(self.settings.genes), dtype=np.float32)
        for gene, value in zip(data, values, strict=True):
            if gene in self._gene_index:
                counts[self._gene_index[gene]] = value
        return counts, tuple(unknown)

    def _non_negative(self, counts: np.ndarray) -> np.ndarray:
        if (counts < 0).any():
            raise self.error("gene counts must not be negative")
        return counts

    def preprocess(self, decoded: GeneCounts) -> Batch:
        counts = decoded.counts.astype(np.float32)
        normalised = np.log1p(counts / counts.sum() * self.settings.target_sum)
        return {"expression": torch.from_numpy(normalised)}

    def model_input(self) -> TensorSpec:
        return TensorSpec("expression", "float32", (len(self.settings.genes),))

    def build_encoder(self) -> nn.Module:
        return ScrnaEncoder(len(self.settings.genes), width(self.size, 256, 1024), self.embed_dim)
