"""Triton as an encoder backend, against a real Open Inference Protocol server (the session's
gateway), and `multimed export --format triton`."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from multimed.models.catalog import CATALOG
from multimed.models.cohort.writer import FILES

REMOTE = ("xray", "text", "protein")  # must match conftest's remote_server


def _embedding(response) -> np.ndarray:
    return np.frombuffer(response.embedding.data, dtype=np.float32)


def test_triton_backend_embeddings_equal_in_process_ones(server, remote_server):
    from multimed.client import MultiMedClient

    folder = server.patients[1]
    with server.client() as local, MultiMedClient(remote_server, token=server.token) as remote:
        for m in REMOTE:
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
