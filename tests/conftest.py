"""Fixtures the server tiers (integration, system) share: one small trained bundle and one
synthetic cohort. Each tier's conftest starts its own server; `make test` runs each tier as a
pytest session of its own, so a tier's server stops with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from bundles import shared_bundle, small_bundle

from multimed.models.cohort.writer import write_cohort


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The small bundle `make test-bundle` trained, else one trained here (tests/bundles.py)."""
    return shared_bundle() or small_bundle(tmp_path_factory.mktemp("bundle") / "serving")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, 3, seed=11)
    return out
