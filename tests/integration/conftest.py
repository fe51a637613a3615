"""The SDK client of the session's server (tests/conftest.py), and a second server whose
encoders run on it."""

from __future__ import annotations

import pytest
from servers import TOKEN, free_port, running_server, serve_config, token_file


@pytest.fixture(scope="module")
def client(server):
    """The SDK's client of the session's server (test_oip's `client` is tritonclient's)."""
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def remote_server(server, tmp_path_factory):
    """A second server whose X-ray, text and protein encoders run on the first server's
    `encoder_<modality>` models, and whose OCT encoder points at a closed port. Its router
    reaches its own encoders by Ray actor calls, the session server's by direct gRPC."""
    work = tmp_path_factory.mktemp("remote")
    tokens = token_file(work, {"integration": TOKEN})
    remote = {"backend": "triton", "url": server.url, "token_file": str(tokens)}
    encoders = {m: remote for m in ("xray", "text", "protein")}  # image, features, tokens
    encoders["oct"] = {"backend": "triton", "url": f"127.0.0.1:{free_port()}", "timeout_s": 2}
    config = serve_config(work / "serve_config.yaml", server.bundle, encoders, transport="ray")
    with running_server(work, config) as (url, _, _):
        yield url
