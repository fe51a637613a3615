"""Fusion strategies after MultiBench: encoders / fusion / head are three swappable parts.

A fusion is a pure function of its inputs with an explicit presence mask:
`fusion(embeddings: Mapping[str, Tensor[B, D]], present: Mapping[str, Tensor[B] bool]) -> [B, D]`.
A modality absent from `embeddings` or with present=False is masked out, never used as zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from multimed.models.config import FusionName


class Fusion(nn.Module):
    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__()
        self.modalities = tuple(modalities)
        self.dim = dim

    def stack(
        self, embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """-> embeddings [B, M, D] (zeros where absent) and mask [B, M] (True where present)."""
        ref = next(iter(embeddings.values()))
        zeros = ref.new_zeros(ref.shape)
        no = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
        mask = torch.stack(
            [present.get(m, no) if m in embeddings else no for m in self.modalities], 1
        )
        if not mask.any(1).all():
            raise ValueError("every item needs at least one present modality")
        x = torch.stack([embeddings.get(m, zeros) for m in self.modalities], 1)
        return x * mask.unsqueeze(-1), mask


class LateFusion(Fusion):
    """Per-modality projections averaged over the present ones. With a linear head this equals
    averaging per-modality heads (MultiMed's late fusion)."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim)
        self.proj = nn.ModuleDict(
            {
                m: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
                for m in modalities
            }
        )

    def forward(self, embeddings, present):
        x, mask = self.stack(embeddings, present)
        projected = torch.stack([self.proj[m](x[:, i]) for i, m in enumerate(self.modalities)], 1)
        weights = mask.unsqueeze(-1).to(projected.dtype)
        return (projected * weights).sum(1) / weights.sum(1)


class EarlyFusion(Fusion):
    """Concatenation of all modality slots plus the presence mask itself, then an MLP."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__(modalities, dim)
        n = len(modalities)
        self.mlp = nn.Sequential(
            nn.LayerNorm(n * dim + n), nn.Linear(n * dim + n, dim), nn.GELU(), nn.Linear(dim, dim)
        )

    def forward(self, embeddings, present):
        x, mask = self.stack(embeddings, present)
        return self.mlp(torch.cat([x.flatten(1), mask.to(x.dtype)], 1))


class AttentionFusion(Fusion):
    """A small transformer over modality tokens (each tagged with a learned modality embedding);
    absent modalities are excluded by the key padding mask, and the present tokens' outputs are
    averaged. Averaging token outputs, rather than reading a learned summary token, keeps each
    modality's own embedding on the residual path to the result; a final LayerNorm was left out
    because, measured, it kept weak modalities (genomics) from being learned at all."""

    def __init__(self, modalities: Sequence[str], dim: int, layers: int = 1, heads: int = 4):
        super().__init__(modalities, dim)
        self.type_embedding = nn.Parameter(torch.randn(len(modalities), dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True
        )
        # The nested-tensor fast path changes numerics with the padding; keep batch-invariant.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, embeddings, present):
        x, mask = self.stack(embeddings, present)
        out = self.encoder(x + self.type_embedding, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(out.dtype)
        return (out * weights).sum(1) / weights.sum(1)


FUSIONS: dict[str, type[Fusion]] = {
    "late": LateFusion,
    "early": EarlyFusion,
    "attention": AttentionFusion,
}


def build_fusion(name: FusionName, modalities: Sequence[str], dim: int) -> Fusion:
    return FUSIONS[name](modalities, dim)
