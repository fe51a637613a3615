"""Task heads, one per output kind, and the conversion of their raw outputs into results."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multimed.models.catalog import OutputKind, TaskSpec


class Head(nn.Module):
    """fused [B, D] (+ tokens [B, L, D] for per-token tasks) -> raw outputs."""

    def __init__(self, spec: TaskSpec, dim: int):
        super().__init__()
        self.kind = spec.output
        n = len(spec.labels)
        per_token = self.kind is OutputKind.PER_TOKEN
        self.mlp = nn.Sequential(
            nn.Linear(dim * 2 if per_token else dim, dim), nn.GELU(), nn.Linear(dim, n)
        )

    def forward(self, fused: Tensor, tokens: Tensor | None = None) -> Tensor:
        if self.kind is OutputKind.PER_TOKEN:
            # Each residue sees its own embedding plus the whole-input summary.
            context = fused.unsqueeze(1).expand(-1, tokens.shape[1], -1)
            return self.mlp(torch.cat([tokens, context], -1))  # [B, L, n]
        return self.mlp(fused)  # [B, n]


def loss(kind: OutputKind, raw: Tensor, target: Tensor, token_mask: Tensor | None = None) -> Tensor:
    if kind in (OutputKind.SINGLE_LABEL, OutputKind.ANSWER):
        return nn.functional.cross_entropy(raw, target)
    if kind is OutputKind.MULTI_LABEL:
        return nn.functional.binary_cross_entropy_with_logits(raw, target.float())
    if kind is OutputKind.REGRESSION:
        return nn.functional.mse_loss(raw, target)
    return nn.functional.cross_entropy(raw[token_mask], target[token_mask])


@dataclass(frozen=True)
class Prediction:
    """One item's task output in the shared output kinds."""

    kind: OutputKind
    labels: tuple[str, ...]
    scores: list[float] | list[list[float]]  # per label (REGRESSION: the values); per token
    predicted: list[str]  # top label (single/answer), labels over threshold (multi), per-token


def to_predictions(
    spec: TaskSpec, raw: Tensor, token_mask: Tensor | None = None
) -> list[Prediction]:
    kind, labels = spec.output, spec.labels
    out = []
    for i in range(raw.shape[0]):
        if kind in (OutputKind.SINGLE_LABEL, OutputKind.ANSWER):
            p = raw[i].softmax(-1)
            out.append(Prediction(kind, labels, p.tolist(), [labels[int(p.argmax())]]))
        elif kind is OutputKind.MULTI_LABEL:
            p = raw[i].sigmoid()
            chosen = [lab for lab, s in zip(labels, p.tolist(), strict=True) if s >= 0.5]
            out.append(Prediction(kind, labels, p.tolist(), chosen))
        elif kind is OutputKind.REGRESSION:
            out.append(Prediction(kind, labels, raw[i].tolist(), []))  # scores are the values
        else:
            p = raw[i][token_mask[i]].softmax(-1)
            out.append(Prediction(kind, labels, p.tolist(), [labels[j] for j in p.argmax(-1)]))
    return out
