"""When an answer should not be trusted: per-task temperature scaling of the scores, and per
modality an out-of-distribution score of the embedding and the encoder's descriptor. Both are
fitted after training, on data the weights never saw (the validation split), and travel in the
bundle as buffers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multimed.models.outputs import Output

ECE_BINS = 15
ACCEPT = 0.95  # in-distribution validation items under the OOD threshold
SHRINK = 0.1  # correlation shrinkage toward the identity: features outnumber few patients
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
    ece = sum(
        n / len(probability) * abs(p - o) for p, o, n in reliability_bins(probability, outcome)
    )
    return {
        "ece": round(ece, 4),
        "brier": round(float(((probability - outcome) ** 2).mean()), 4),
        "nll": round(float(output.loss(raw, target)), 4),
    }


def reliability_bins(probability: Tensor, outcome: Tensor) -> list[tuple[float, float, int]]:
    """Per equal-width confidence bin that holds events: their mean probability, how often they
    happened, and how many there are (a reliability diagram's points; ECE weighs their gaps)."""
    bins = torch.clamp((probability * ECE_BINS).long(), max=ECE_BINS - 1)
    return [
        (float(probability[inside].mean()), float(outcome[inside].mean()), int(inside.sum()))
        for b in range(ECE_BINS)
        if (inside := bins == b).any()
    ]


@dataclass(frozen=True)
class OodScore:
    """One input's out-of-distribution score against its modality's threshold."""

    score: float
    threshold: float
    flagged: bool


def novelty_input(pooled: Tensor, descriptor: Tensor) -> Tensor:
    """What the OOD score reads for a batch: the embedding and the encoder's descriptor."""
    return torch.cat([pooled.float(), descriptor.float()], -1)


class Novelty(nn.Module):
    """One modality's out-of-distribution score: the Mahalanobis distance of an input's
    `novelty_input` to the training inputs', each feature standardised and their correlation
    shrunk toward the identity (features outnumber patients), divided by sqrt(K) so that a
    typical training item scores about 1. Flagged above `threshold`, which 95 % of
    in-distribution validation items stay under. Unfitted (a modality never trained), nothing
    is flagged."""

    def __init__(self):
        super().__init__()
        # Sized when fitted, or when loaded: K is the encoder's, known only then.
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("scale", torch.ones(0))
        self.register_buffer("precision", torch.zeros(0, 0))
        self.register_buffer("threshold", torch.tensor(math.inf))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("mean", "scale", "precision"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty_like(stored))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: Tensor) -> Tensor:
        """[B, K] -> [B] scores (0 while unfitted)."""
        if self.mean.numel() == 0:
            return torch.zeros(len(features))
        z = (features.float() - self.mean) / self.scale
        d2 = ((z @ self.precision) * z).sum(-1).clamp(min=0)
        return (d2 / self.mean.numel()).sqrt()

    @torch.no_grad()
    def fit(self, train: Tensor, validation: Tensor) -> None:
        # A feature constant in training (a dead unit) gets a unit scale: any change there is
        # measured against the shrinkage alone.
        scale = train.std(0)
        self.mean = train.mean(0)
        self.scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
        z = (train - self.mean) / self.scale
        correlation = (1 - SHRINK) * torch.cov(z.T) + SHRINK * torch.eye(len(self.mean))
        self.precision = torch.linalg.inv(correlation)
        self.threshold.copy_(torch.quantile(self(validation), ACCEPT))

    def flags(self, features: Tensor) -> list[OodScore]:
        threshold = float(self.threshold)
        return [OodScore(float(s), threshold, float(s) > threshold) for s in self(features)]
