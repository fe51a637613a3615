"""The system tier's server: X-ray (two replicas) and scRNA as deployments of their own, the
encoders its tests load, kill and measure; every other encoder in the router (one process to
start, not eight); behind the nginx front, which the overload test needs. Each test that kills
replicas leaves the server recovered."""

from __future__ import annotations

import pytest
from servers import Server, running_server, serve_config

DEPLOYED = {"xray", "scrna"}


@pytest.fixture(scope="session")
def server(tmp_path_factory, bundle, cohort) -> Server:
    work = tmp_path_factory.mktemp("server")
    config = serve_config(work / "serve_config.yaml", bundle, deployed=DEPLOYED)
    with running_server(work, config, extra=("--front",)) as (url, metrics_url, process):
        yield Server(url, metrics_url, bundle, cohort, process, log=work / "serve.log")
