"""One real server for the system tier (X-ray at two replicas, so one can be killed), with the
pids of its processes."""

from __future__ import annotations

import pytest
from servers import Server, running_server, serve_config


@pytest.fixture(scope="session")
def system_server(tmp_path_factory, bundle, cohort) -> Server:
    work = tmp_path_factory.mktemp("system")
    config = serve_config(work / "serve_config.yaml", bundle)
    with running_server(work, config) as (url, metrics_url, process):
        yield Server(url, metrics_url, bundle, cohort, process)
