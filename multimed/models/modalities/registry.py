"""The registry of modality pipelines: one module per modality, listed here explicitly.
Adding a modality is its module plus one line in `_register(...)` below."""

from __future__ import annotations

from multimed.models.catalog import CATALOG
from multimed.models.config import ModelConfig
from multimed.models.modalities.base import EncoderOutput, ModalityPipeline
from multimed.models.modalities.ct import CTPipeline
from multimed.models.modalities.eeg import EEGPipeline
from multimed.models.modalities.genomics import GenomicsPipeline
from multimed.models.modalities.mri import MRIPipeline
from multimed.models.modalities.oct import OCTPipeline
from multimed.models.modalities.pathology import PathologyPipeline
from multimed.models.modalities.protein import ProteinPipeline
from multimed.models.modalities.scrna import ScrnaPipeline
from multimed.models.modalities.text import TextPipeline
from multimed.models.modalities.xray import XrayPipeline


def _register(*classes: type[ModalityPipeline]) -> dict[str, type[ModalityPipeline]]:
    registry: dict[str, type[ModalityPipeline]] = {}
    for cls in classes:
        if cls.modality in registry:
            raise ValueError(f"duplicate pipeline for modality {cls.modality!r}")
        CATALOG.modality(cls.modality)  # a pipeline must have a catalog entry
        registry[cls.modality] = cls
    missing = set(CATALOG.modalities) - set(registry)
    if missing:
        raise ValueError(f"catalog modalities without a pipeline: {sorted(missing)}")
    return registry


PIPELINES = _register(
    TextPipeline,
    OCTPipeline,
    XrayPipeline,
    CTPipeline,
    MRIPipeline,
    PathologyPipeline,
    EEGPipeline,
    GenomicsPipeline,
    ScrnaPipeline,
    ProteinPipeline,
)


def build_pipeline(modality: str, config: ModelConfig) -> ModalityPipeline:
    cls = PIPELINES[CATALOG.modality(modality).id]
    return cls(config.modalities.get(modality), size=config.size, embed_dim=config.embed_dim)


def build_pipelines(config: ModelConfig) -> dict[str, ModalityPipeline]:
    return {m: build_pipeline(m, config) for m in PIPELINES}


__all__ = [
    "PIPELINES",
    "EncoderOutput",
    "ModalityPipeline",
    "build_pipeline",
    "build_pipelines",
]
