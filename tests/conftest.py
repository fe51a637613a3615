"""Fixtures the server tiers (integration, system) share: one small trained bundle, one
synthetic cohort and one real server (X-ray at two replicas) per session. The system tier runs
after the integration tier and kills replicas; each of its tests leaves the server recovered."""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import Server, running_server, serve_config

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


@pytest.fixture(scope="session")
def server(tmp_path_factory, bundle, cohort) -> Server:
    work = tmp_path_factory.mktemp("server")
    config = serve_config(work / "serve_config.yaml", bundle)
    with running_server(work, config) as (url, metrics_url, process):
        yield Server(url, metrics_url, bundle, cohort, process)
