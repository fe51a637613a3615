"""Fixtures the server tiers (integration, system) share: one small trained bundle and one
synthetic cohort per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from multimed.models.cohort.writer import write_cohort
from multimed.models.config import ModelConfig
from multimed.models.train import TrainSettings, train


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "serving"
    train(out, TrainSettings(patients=60, epochs=1, real_cells=False), ModelConfig())
    return out


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, 3, seed=11)
    return out
