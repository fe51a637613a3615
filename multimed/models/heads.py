"""Task heads: an MLP per task over what its output kind feeds it (see `outputs`)."""

from __future__ import annotations

from torch import Tensor, nn

from multimed.models.catalog import TaskSpec
from multimed.models.outputs import output_of


class Head(nn.Module):
    """fused [B, D] (+ tokens [B, L, D] for per-token kinds) -> raw outputs [B, n] ([B, L, n])."""

    def __init__(self, spec: TaskSpec, dim: int):
        super().__init__()
        self.output = output_of(spec)
        self.mlp = nn.Sequential(
            nn.Linear(self.output.head_width(dim), dim), nn.GELU(), nn.Linear(dim, len(spec.labels))
        )

    def forward(self, fused: Tensor, tokens: Tensor | None = None) -> Tensor:
        return self.mlp(self.output.head_input(fused, tokens))
