"""Triton as an encoder backend, against a real Open Inference Protocol server (the session's
gateway, and a second server whose encoders run on it), and `multimed export --format
triton`."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from servers import TOKEN, free_port, running_server, serve_config, token_file
from tritonclient.grpc import model_config_pb2 as mc

from multimed.models.catalog import CATALOG
from multimed.models.cohort.writer import FILES

REMOTE = ("xray", "text", "protein")  # image, features, tokens
OWN = "pathology"  # the second server's one deployment of its own, reached by Ray actor calls


@pytest.fixture(scope="module")
def remote_server(server, tmp_path_factory):
    """A second server whose X-ray, text and protein encoders run on the first server's
    `encoder_<modality>` models, and whose OCT encoder points at a closed port. Its router
    reaches its own pathology deployment by Ray actor calls, the session server's by direct
    gRPC; its other encoders run in the router."""
    work = tmp_path_factory.mktemp("remote")
    tokens = token_file(work, {"integration": TOKEN})
    remote = {"backend": "triton", "url": server.url, "token_file": str(tokens)}
    encoders = dict.fromkeys(REMOTE, remote)
    encoders["oct"] = {"backend": "triton", "url": f"127.0.0.1:{free_port()}", "timeout_s": 2}
    config = serve_config(
        work / "serve_config.yaml", server.bundle, encoders, transport="ray", deployed={OWN}
    )
    with running_server(work, config) as (url, _, _):
        yield url


def _embedding(response) -> np.ndarray:
    return np.frombuffer(response.embedding.data, dtype=np.float32)


def test_triton_backend_embeddings_equal_in_process_ones(server, remote_server):
    from multimed.client import MultiMedClient

    folder = server.patients[1]
    with server.client() as local, MultiMedClient(remote_server, token=server.token) as remote:
        for m in (*REMOTE, OWN):
            value = folder / FILES[m]
            if m == "text":
                value = value.read_text()
            want, got = local.embed(m, value), remote.embed(m, value)
            np.testing.assert_allclose(_embedding(got), _embedding(want), atol=1e-5)
            if CATALOG.modality(m).emits_tokens:
                shape = tuple(want.token_embeddings.shape)
                assert tuple(got.token_embeddings.shape) == shape
                np.testing.assert_allclose(
                    np.frombuffer(got.token_embeddings.data, np.float32),
                    np.frombuffer(want.token_embeddings.data, np.float32),
                    atol=1e-5,
                )
        task = "radiographic_findings_classification"
        inputs = {"xray": folder / FILES["xray"], "text": (folder / FILES["text"]).read_text()}
        want, got = local.predict(task, inputs), remote.predict(task, inputs)
        np.testing.assert_allclose(
            [s.score for s in got.scores], [s.score for s in want.scores], atol=1e-5
        )


def test_triton_backend_down_is_unavailable_naming_the_server(server, remote_server):
    from multimed.client import MultiMedClient

    folder = server.patients[0]
    with MultiMedClient(remote_server, token=server.token) as remote:
        with pytest.raises(grpc.RpcError) as caught:
            remote.embed("oct", folder / FILES["oct"])
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "oct encoder: model 'encoder_oct' on the Triton server at 127.0.0.1:" in (
            caught.value.details()
        )
        assert remote.embed("xray", folder / FILES["xray"])  # the others keep serving


def test_export_triton_repository_matches_torch(server, tmp_path):
    out = tmp_path / "repository"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "multimed.cli",
            "export",
            "--format",
            "triton",
            "--bundle",
            str(server.bundle),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "export.json").read_text())["max_abs_diff"]
    assert set(report) == set(CATALOG.modalities)
    assert max(report.values()) < 1e-4, report
    for m in CATALOG.modalities:
        folder = out / f"encoder_{m}"
        assert (folder / "1" / "model.onnx").stat().st_size > 0
        config = text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.name == f"encoder_{m}" and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size > 1 and config.HasField("dynamic_batching")
        assert [i.name for i in config.input] == [m]
        assert config.output[0].name == "embedding" and config.output[-1].name == "descriptor"
    assert "max |onnxruntime - torch|" in run.stdout
