"""Typed model configuration. Stored in every bundle's manifest, so a bundle rebuilds exactly the
modules it was trained with."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


EncoderSize = Literal["tiny", "base"]
Precision = Literal["fp32", "bf16"]  # an encoder's forward pass: float32, or bfloat16 autocast
FusionName = Literal["late", "early", "attention"]


class ModelConfig(Frozen):
    size: EncoderSize = "tiny"  # tiny trains on a 2-core CPU; base is for GPUs
    embed_dim: int = Field(128, ge=8, le=4096)  # every encoder's pooled output width
    fusion: FusionName = "attention"
    # Per-modality settings, validated by each pipeline's own `Settings` model (extra="forbid"),
    # so adding a modality needs no change here.
    modalities: dict[str, dict[str, Any]] = Field(default_factory=dict)
