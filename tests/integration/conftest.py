"""The integration tier's server: every encoder a deployment of its own (X-ray at two replicas)
but OCT's, which runs in the router (the opt-in placement); behind the nginx front; a real
Orthanc as its PACS and a FHIR receiver; Ray's dashboard on. And its SDK client."""

from __future__ import annotations

import socket

import pytest
from hospital import fhir_receiver, running_orthanc
from servers import Server, free_port, running_server, serve_config


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real PACS (Orthanc + DICOMweb), configured as `main` on the session's server."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs


@pytest.fixture(scope="session")
def fhir(tmp_path_factory):
    """-> (FhirReceiver, token file): the session server's FHIR endpoint."""
    with fhir_receiver(tmp_path_factory.mktemp("fhir")) as receiver:
        yield receiver


@pytest.fixture(scope="session")
def silent_port():
    """A port that takes connections and never answers: a PACS too slow to wait for."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory, bundle, cohort, orthanc, fhir, silent_port) -> Server:
    work = tmp_path_factory.mktemp("server")
    receiver, fhir_token = fhir
    hospital = {
        "pacs": {
            "main": orthanc.pacs_config(),
            "down": {"url": f"http://127.0.0.1:{free_port()}/dicom-web", "timeout_s": 2},
            "slow": {"url": f"http://127.0.0.1:{silent_port}/dicom-web", "timeout_s": 2},
        },
        "fhir": {"url": receiver.url, "token_file": str(fhir_token), "attempts": 3},
    }
    # OCT's encoder runs inside the router replica (the opt-in placement), every other in a
    # deployment of its own: the retinopathy tests go through the one, the rest the other.
    config = serve_config(
        work / "serve_config.yaml", bundle, hospital=hospital, in_router={"oct": {}}
    )
    # Ray's own tools are tested against its dashboard. Its clients reach it through the nginx
    # front, so every protocol is tested through nginx as well.
    extra = ("--dashboard-port", str(free_port()), "--front")
    with running_server(work, config, extra=extra) as (url, metrics_url, process):
        yield Server(url, metrics_url, bundle, cohort, process, log=work / "serve.log")


@pytest.fixture(scope="module")
def client(server):
    """The SDK's client of the tier's server (test_oip's `client` is tritonclient's)."""
    with server.client() as c:
        yield c
