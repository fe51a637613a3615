"""DNA sequence -> per-base and pooled embeddings with a small dilated CNN."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from multimed.models.config import Frozen
from multimed.models.modalities.base import (
    Batch,
    EncoderOutput,
    width,
)
from multimed.models.modalities.sequence import SequencePipeline

ALPHABET = "ACGTN"


class GenomicsSettings(Frozen):
    max_length: int = Field(2000, ge=1)
    min_length: int = Field(8, ge=1)


class GenomicsEncoder(nn.Module):
    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        # Centred one-hot rows for A, C, G, T (each minus the uniform 0.25), so that N (uniform
        # over the bases) and padding are both exactly zero: no evidence either way.
        one_hot = torch.cat([torch.eye(4) - 0.25, torch.zeros(2, 4)])
        self.register_buffer("one_hot", one_hot, persistent=False)
        self.conv1 = nn.Conv1d(4, channels, kernel_size=9, padding=4)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=9, dilation=2, padding=8)
        self.token_proj = nn.Linear(channels, embed_dim)
        self.pool_proj = nn.Linear(channels, embed_dim)

    def forward(self, batch: Batch) -> EncoderOutput:
        tokens, mask = batch["tokens"], batch["mask"]
        keep = mask.unsqueeze(1).float()  # [B, 1, L]
        x = F.embedding(tokens, self.one_hot).transpose(1, 2)  # [B, 4, L]
        # Zero padded positions after each conv, so padding looks exactly like the conv's own
        # zero border and a sequence's outputs do not depend on what it was batched with.
        motifs = F.gelu(self.conv1(x)) * keep
        context = F.gelu(self.conv2(motifs)) * keep
        # The sequence summary is whether each first-layer motif detector fired anywhere
        # (DeepBind-style max pooling); pooling the deeper layer instead memorises sequences.
        peak = motifs.masked_fill(keep == 0, float("-inf")).amax(-1)
        return EncoderOutput(
            self.pool_proj(peak), self.token_proj(context.transpose(1, 2)), mask, descriptor=peak
        )


class GenomicsPipeline(SequencePipeline):
    """Decoded type: `str`, upper-case over ACGTN."""

    modality = "genomics"
    alphabet = ALPHABET
    Settings = GenomicsSettings

    def build_encoder(self) -> nn.Module:
        return GenomicsEncoder(width(self.size, 64, 256), self.embed_dim)
