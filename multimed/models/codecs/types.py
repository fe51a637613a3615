"""Decoded domain types that more than a codec use (pipelines, the synthetic cohort): numpy only,
so the cohort can build them without importing the pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EEGRecord:
    """Decoded EEG: microvolts, one row per channel."""

    data: np.ndarray  # float32 [channels, samples]
    channels: tuple[str, ...]
    sample_rate_hz: float


@dataclass(frozen=True)
class GeneCounts:
    """Decoded scRNA-seq profile aligned to the encoder's gene order."""

    counts: np.ndarray  # float32 [genes], raw (not normalised) counts
    unknown_genes: tuple[str, ...] = ()  # genes in the input that the encoder does not know
