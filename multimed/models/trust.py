"""When an answer should not be trusted: per-task temperature scaling of the scores, and per
modality an out-of-distribution score of the pooled embedding. Both are fitted after training,
on data the weights never saw (the validation split), and travel in the bundle as buffers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multimed.models.outputs import Output

ECE_BINS = 15
ACCEPT = 0.95  # in-distribution validation items under the OOD threshold
SHRINK = 0.1  # covariance shrinkage toward its mean variance: embeddings outnumber few patients
TEMPERATURES = torch.logspace(-1.5, 1.5, 121)  # 0.03 to 32, ~6 % apart


def fit_temperature(output: Output, raw: Tensor, target: Tensor) -> float:
    """The T that minimises the kind's own loss (cross-entropy: NLL) of raw / T on held-out
    outputs: a grid, then a finer grid around its best point."""
    if not output.calibrated or len(raw) == 0:
        return 1.0

    def best(grid: Tensor) -> float:
        losses = torch.stack([output.loss(raw / t, target) for t in grid])
        return float(grid[int(losses.argmin())])

    coarse = best(TEMPERATURES)
    return best(coarse * torch.logspace(-0.05, 0.05, 21))


def calibration(output: Output, raw: Tensor, target: Tensor) -> dict[str, float]:
    """ECE (15 equal-width bins), Brier score and NLL of one task's outputs. The kind names its
    events: the top label for single-label and per-token kinds, each label for multi-label."""
    probability, outcome = output.events(raw, target)
    bins = torch.clamp((probability * ECE_BINS).long(), max=ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            gap = probability[inside].mean() - outcome[inside].mean()
            ece += float(inside.float().mean() * gap.abs())
    return {
        "ece": round(ece, 4),
        "brier": round(float(((probability - outcome) ** 2).mean()), 4),
        "nll": round(float(output.loss(raw, target)), 4),
    }


@dataclass(frozen=True)
class OodScore:
    """One input's out-of-distribution score against its modality's threshold."""

    score: float
    threshold: float
    flagged: bool


class Novelty(nn.Module):
    """One modality's out-of-distribution score: the Mahalanobis distance of a pooled embedding
    to the training embeddings (their mean and shrunk covariance), divided by sqrt(D) so that a
    typical training item scores about 1. Flagged above `threshold`, which 95 % of in-distribution
    validation items stay under. Unfitted (a modality never trained), nothing is flagged."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("threshold", torch.tensor(math.inf))

    def forward(self, pooled: Tensor) -> Tensor:
        """[B, D] -> [B] scores."""
        centred = pooled.float() - self.mean
        d2 = ((centred @ self.precision) * centred).sum(-1).clamp(min=0)
        return (d2 / self.mean.numel()).sqrt()

    @torch.no_grad()
    def fit(self, train: Tensor, validation: Tensor) -> None:
        mean = train.mean(0)
        covariance = torch.cov((train - mean).T)
        spread = covariance.diagonal().mean()
        covariance = (1 - SHRINK) * covariance + SHRINK * spread * torch.eye(len(mean))
        self.mean.copy_(mean)
        self.precision.copy_(torch.linalg.inv(covariance))
        self.threshold.copy_(torch.quantile(self(validation), ACCEPT))

    def flags(self, pooled: Tensor) -> list[OodScore]:
        threshold = float(self.threshold)
        return [OodScore(float(s), threshold, float(s) > threshold) for s in self(pooled)]
