"""Amino-acid sequence -> per-residue and pooled embeddings (local conv + transformer)."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from multimed.models.config import Frozen
from multimed.models.modalities.base import (
    Batch,
    EncoderOutput,
)
from multimed.models.modalities.sequence import SequencePipeline

ALPHABET = "ACDEFGHIKLMNPQRSTVWY" + "X"  # 20 standard amino acids + unknown
PAD = len(ALPHABET)  # token id 21


class ProteinSettings(Frozen):
    max_length: int = Field(1024, ge=1)
    min_length: int = Field(5, ge=1)


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> Tensor:
    """Fixed positions (Vaswani et al.): no weights, and any length up to max_length works."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class ProteinEncoder(nn.Module):
    def __init__(self, channels: int, layers: int, heads: int, embed_dim: int):
        super().__init__()
        self.embed = nn.Embedding(len(ALPHABET) + 1, channels, padding_idx=PAD)
        self.local = nn.Conv1d(channels, channels, kernel_size=5, padding=2)
        layer = nn.TransformerEncoderLayer(
            channels, heads, dim_feedforward=4 * channels, activation="gelu", batch_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.token_proj = nn.Linear(channels, embed_dim)
        self.pool_proj = nn.Linear(channels, embed_dim)

    def forward(self, batch: Batch) -> EncoderOutput:
        tokens, mask = batch["tokens"], batch["mask"]
        keep = mask.unsqueeze(-1).float()  # [B, L, 1]
        x = self.embed(tokens) + sinusoidal_positions(
            tokens.shape[1], self.embed.embedding_dim, tokens.device
        )
        x = x * keep  # padding must look like the conv's zero border
        x = x + F.gelu(self.local(x.transpose(1, 2))).transpose(1, 2) * keep
        h = self.transformer(x, src_key_padding_mask=~mask)
        mean = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return EncoderOutput(self.pool_proj(mean), self.token_proj(h), mask, descriptor=mean)


class ProteinPipeline(SequencePipeline):
    """Decoded type: `str`, upper-case over the 20 standard amino acids and X."""

    modality = "protein"
    alphabet = ALPHABET
    Settings = ProteinSettings

    def build_encoder(self) -> nn.Module:
        channels, layers, heads = (64, 1, 4) if self.size == "tiny" else (256, 4, 8)
        return ProteinEncoder(channels, layers, heads, self.embed_dim)
