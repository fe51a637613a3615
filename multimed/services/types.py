"""Protocol-free request and result types: what the front doors convert wire messages into, and what
the router and encoders pass between them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from multimed.models.inputs import RawInput
from multimed.models.outputs import Prediction
from multimed.models.trust import OodScore


@dataclass(frozen=True)
class Embedding:
    """One item's encoder output, plus how it was computed (for metrics)."""

    pooled: np.ndarray  # [D]
    tokens: np.ndarray | None  # [L, D]
    descriptor: np.ndarray  # [K]: what the OOD score reads besides `pooled` (EncoderOutput's)
    batch_size: int = 1  # size of the encoder batch it ran in; 0 when served from the cache
    queue_depth: int = 0  # requests waiting at the encoder when it was batched
    replica: str = ""  # the encoder replica that computed it
    gpu_utilization: float | None = None  # its GPU's, sampled at most once a second; None: CPU


@dataclass(frozen=True)
class EncodeStats:
    """How one input was encoded, reported back for metrics (no arrays travel back)."""

    batch_size: int  # 0: served from the router's cache
    queue_depth: int
    replica: str
    gpu_utilization: float | None = None


@dataclass(frozen=True)
class PredictCall:
    request_id: str
    task: str
    inputs: tuple[RawInput, ...]
    explain: bool = False
    deadline: float | None = None  # absolute time.time() by which the answer is useless


@dataclass(frozen=True)
class PredictResult:
    request_id: str
    task: str
    prediction: Prediction
    used: tuple[str, ...]
    missing: tuple[str, ...]
    bundle_version: str
    encode_ms: float
    fuse_ms: float
    contributions: dict[str, float] = field(default_factory=dict)
    encoders: dict[str, EncodeStats] = field(default_factory=dict)  # per modality
    out_of_distribution: dict[str, OodScore] = field(default_factory=dict)  # per used modality
