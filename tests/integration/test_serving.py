"""The served system end to end, through real clients: the SDK (sync and asyncio), the CLI,
grpc_health and reflection, and a Prometheus scrape."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from servers import StreamMetadata, health, metric, replicas, scrape

from multimed.client import AsyncMultiMedClient, MultiMedClient
from multimed.client.sdk import predict_request
from multimed.models.bundle import load_bundle
from multimed.models.catalog import CATALOG, InputForm
from multimed.models.cohort.writer import FILES, QUESTION_FILE
from multimed.models.inputs import RawInput
from multimed.models.modalities.registry import build_pipeline
from multimed.models.tasks import TaskModels
from multimed.v1 import multimed_pb2 as pb


def request_inputs(folder: Path, task: str, vqa_modality: str) -> dict[str, object]:
    """What a hospital client would send for `task`, from the files `multimed synth` wrote."""
    spec = CATALOG.task(task)
    if task == "medical_vqa":
        return {
            "text": (folder / QUESTION_FILE).read_text(),
            vqa_modality: folder / FILES[vqa_modality],
        }
    inputs: dict[str, object] = {m: folder / FILES[m] for m in spec.accepted if m != "text"}
    if "text" in spec.accepted:
        inputs["text"] = (folder / FILES["text"]).read_text()
    return inputs


def random_xray(seed: int) -> RawInput:
    image = np.random.default_rng(seed).random((1, 64, 64), dtype=np.float32)
    return RawInput("xray", InputForm.TENSOR, image)


@pytest.fixture(scope="module")
def labels(server):
    return json.loads((server.cohort / "labels.json").read_text())


@pytest.mark.parametrize("task", list(CATALOG.tasks))
def test_every_task_end_to_end_from_synth_files(server, client, labels, task):
    folder = server.patients[0]
    inputs = request_inputs(folder, task, labels[folder.name]["vqa_modality"])
    response = client.predict(task, inputs, request_id=f"req-{task}")
    spec = CATALOG.task(task)
    assert response.request_id == f"req-{task}"
    assert response.task == task
    assert set(response.modalities_used) == set(inputs)
    assert response.bundle_version.startswith("multimed-")
    assert response.timing.server_ms > 0
    if response.tokens:  # per-residue labels: one per residue of the FASTA
        sequence = "".join((folder / FILES["protein"]).read_text().splitlines()[1:])
        assert len(response.tokens) == len(sequence)
        assert {t.label for t in response.tokens} <= set(spec.labels)
    else:
        assert [s.label for s in response.scores] == list(spec.labels)


def test_cli_predict_json(server):
    folder = server.patients[1]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "multimed.cli",
            "predict",
            "--url",
            server.url,
            "--task",
            "bone_age_classification",
            "--xray",
            str(folder / "xray.dcm"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "MULTIMED_TOKEN": server.token},  # a secret never on a command line
    )
    doc = json.loads(out.stdout)
    assert doc["task"] == "bone_age_classification"
    assert doc["predicted"][0] in CATALOG.task("bone_age_classification").labels


def test_optional_modalities_missing_and_all_imaging(server, client):
    folder = server.patients[2]
    only_xray = client.predict("disease_classification", {"xray": folder / "xray.dcm"})
    assert list(only_xray.modalities_used) == ["xray"]
    assert set(only_xray.modalities_missing) == {"ct", "mri", "text"}
    everything = client.predict(
        "disease_classification",
        {
            "xray": folder / "xray.dcm",
            "ct": folder / "ct",
            "mri": folder / "mri",
            "text": (folder / "note.txt").read_text(),
        },
        explain=True,
    )
    assert set(everything.modalities_used) == {"xray", "ct", "mri", "text"}
    assert not everything.modalities_missing
    assert set(everything.contributions) == {"xray", "ct", "mri", "text"}


def test_second_task_on_same_inputs_hits_the_embedding_cache(server, client):
    folder = server.patients[0]
    before = metric(scrape(server), "multimed_embedding_cache_total", modality="xray", result="hit")
    client.predict("bone_age_classification", {"xray": folder / "xray.dcm"})
    client.predict("radiographic_findings_classification", {"xray": folder / "xray.dcm"})
    after = metric(scrape(server), "multimed_embedding_cache_total", modality="xray", result="hit")
    assert after >= before + 1


def test_xray_scales_independently_and_both_replicas_work(server):
    counts = {name: len(pids) for name, pids in replicas(server.process.pid).items()}
    assert counts["encoder-xray"] == 2
    # Ten deployments: the router, and every encoder but OCT's, which runs in the router.
    assert len(counts) == 10 and all(n == 1 for d, n in counts.items() if d != "encoder-xray")

    async def burst():
        async with AsyncMultiMedClient(server.url, token=server.token) as c:
            await asyncio.gather(
                *(c.predict("bone_age_classification", {"xray": random_xray(i)}) for i in range(48))
            )

    asyncio.run(burst())
    text = scrape(server)
    answered_by = {
        line.split('replica="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("multimed_encoder_items_total{") and 'modality="xray"' in line
    }
    assert len(answered_by) == 2, answered_by


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


BAD_REQUESTS = {
    "unknown task": (
        "nope",
        {"xray": random_xray(0)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown task 'nope'",
    ),
    "unknown modality": (
        "bone_age_classification",
        {"xray": random_xray(0), "smell": RawInput("smell", InputForm.TEXT, "x")},
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown modality 'smell'",
    ),
    "missing required": (
        "medical_vqa",
        {"xray": random_xray(0)},
        grpc.StatusCode.FAILED_PRECONDITION,
        "requires text",
    ),
    "modality not accepted": (
        "bone_age_classification",
        {"xray": random_xray(0), "text": "note"},
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not accept text",
    ),
    "corrupt dicom": (
        "bone_age_classification",
        {"xray": RawInput("xray", InputForm.DICOM, b"not a dicom file")},
        grpc.StatusCode.INVALID_ARGUMENT,
        "xray:",
    ),
    "nan tensor": (
        "bone_age_classification",
        {"xray": RawInput("xray", InputForm.TENSOR, np.full((1, 64, 64), np.nan, np.float32))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN",
    ),
    "wrong shape": (
        "bone_age_classification",
        {"xray": RawInput("xray", InputForm.TENSOR, np.zeros((2, 3, 4, 5), np.float32))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "xray: tensor must be",
    ),
    "bad nucleotides": (
        "expression_prediction",
        {"genomics": "ACGTXXACGT" * 3},
        grpc.StatusCode.INVALID_ARGUMENT,
        "genomics:",
    ),
    "empty text": (
        "medical_vqa",
        {"text": "   ", "xray": random_xray(0)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "text:",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_clear_codes_and_server_stays_healthy(server, client, case):
    task, inputs, code, message = BAD_REQUESTS[case]
    got, details = _code(lambda: client.predict(task, inputs))
    assert got == code, details
    assert message in details
    assert client.predict("bone_age_classification", {"xray": random_xray(1)}).predicted


def test_oversized_unauthenticated_and_deadline(server, client):
    big = "x" * int((server.max_message_mb + 1) * 1024 * 1024)
    code, details = _code(
        lambda: client.predict("medical_vqa", {"text": big, "xray": random_xray(2)})
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    with MultiMedClient(server.url) as anonymous:
        code, details = _code(lambda: anonymous.catalog())
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in details
    # A fresh input (no cache hit) needs an encoder round trip, far longer than 1 ms.
    code, _ = _code(
        lambda: client.predict(
            "bone_age_classification", {"xray": random_xray(9_999)}, timeout=0.001
        )
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_one_bad_input_does_not_disturb_its_batch(server):
    async def mixed():
        async with AsyncMultiMedClient(server.url, token=server.token) as c:
            calls = []
            for i in range(24):
                raw = random_xray(100 + i)
                if i % 4 == 0:
                    raw = RawInput("xray", InputForm.TENSOR, np.full((1, 64, 64), 2.0, np.float32))
                calls.append(c.predict("bone_age_classification", {"xray": raw}))
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(mixed())
    for i, r in enumerate(results):
        if i % 4 == 0:
            assert isinstance(r, grpc.aio.AioRpcError)
            assert r.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert isinstance(r, pb.PredictResponse), r


def test_an_encoder_placed_in_the_router_answers_like_the_model(server, client):
    """The session's server runs OCT's encoder inside the router replica: its answers equal
    the bundle's models run in this process, a bad input fails alone, and its health and
    replica gauge count the router's own copy."""
    task = "diabetic_retinopathy_classification"
    bundle = load_bundle(server.bundle)
    pipeline = build_pipeline("oct", bundle.config).setup("cpu", bundle.encoder_state("oct"))
    tasks = TaskModels(bundle.config)
    tasks.load_state_dict(bundle.tasks_state())
    tasks.eval()
    rng = np.random.default_rng(7)
    images = [rng.random((1, 64, 64), dtype=np.float32) for _ in range(6)]
    images[3] = np.full((1, 64, 64), np.nan, np.float32)

    async def together():
        async with AsyncMultiMedClient(server.url, token=server.token) as c:
            calls = [c.predict(task, {"oct": RawInput("oct", InputForm.TENSOR, x)}) for x in images]
            return await asyncio.gather(*calls, return_exceptions=True)

    for i, (image, answer) in enumerate(zip(images, asyncio.run(together()), strict=True)):
        if i == 3:
            assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "oct" in answer.details() and "NaN" in answer.details()
            continue
        raw = RawInput("oct", InputForm.TENSOR, image)
        want = tasks.predict(task, {"oct": pipeline.encode([raw])})[0].scores
        got = [s.score for s in answer.scores]
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert health(server.url, f"task/{task}") == health_pb2.HealthCheckResponse.SERVING
    assert metric(scrape(server), "multimed_encoder_replicas", modality="oct") == 1
    assert "encoder-oct" not in replicas(server.process.pid)  # no deployment of its own


def test_predict_stream_matches_by_id_and_reports_errors_inline(server, client):
    folder = server.patients[0]
    requests = [
        predict_request(
            "bone_age_classification", {"xray": folder / "xray.dcm"}, request_id=f"s{i}"
        )
        for i in range(4)
    ]
    requests.append(predict_request("nope", {"xray": random_xray(4)}, request_id="bad"))
    responses = {r.request_id: r for r in client.predict_stream(requests, timeout=120)}
    assert set(responses) == {"s0", "s1", "s2", "s3", "bad"}
    assert responses["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "unknown task" in responses["bad"].error.message
    assert all(responses[f"s{i}"].predicted for i in range(4))


def test_embed_catalog_and_model_info(server, client):
    folder = server.patients[0]
    protein = client.embed("protein", folder / "protein.fasta")
    info = client.model_info()
    assert list(protein.embedding.shape) == [info.embed_dim]
    assert protein.token_embeddings.shape[1] == info.embed_dim
    assert protein.bundle_version == info.bundle_version
    assert set(info.encoder_versions) == set(CATALOG.modalities)
    catalog = client.catalog()
    assert [t.id for t in catalog.tasks] == list(CATALOG.tasks)


def test_request_id_is_echoed_in_metadata(server, client):
    request = predict_request("bone_age_classification", {"xray": random_xray(5)})
    request.request_id = ""
    _, call = client.stub.Predict.with_call(
        request, metadata=(*client.metadata, ("x-request-id", "trace-123")), timeout=60
    )
    assert dict(call.initial_metadata())["x-request-id"] == "trace-123"


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "multimed.v1.MultiMed"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:  # tokens are on: reflection needs one
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bearer = (("authorization", f"Bearer {server.token}"),)
    with grpc.intercept_channel(
        grpc.insecure_channel(server.url), StreamMetadata(bearer)
    ) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "multimed.v1.MultiMed" in services
        assert "grpc.health.v1.Health" in services


def test_metrics_counters_move(server, client):
    before = metric(
        scrape(server), "multimed_requests_total", task="bone_age_classification", code="OK"
    )
    client.predict("bone_age_classification", {"xray": random_xray(6)})
    text = scrape(server)
    assert (
        metric(text, "multimed_requests_total", task="bone_age_classification", code="OK")
        == before + 1
    )
    assert metric(text, "multimed_encoder_batch_size_count", modality="xray") > 0
    assert "multimed_request_latency_seconds_bucket" in text
