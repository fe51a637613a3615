"""The Open Inference Protocol on the gateway's port, through Triton's own clients:
tritonclient.grpc (sync and asyncio) and perf_analyzer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from multimed.client.files import read_input
from multimed.models.bundle import load_bundle
from multimed.models.catalog import CATALOG, InputForm, OutputKind
from multimed.models.cohort.synthetic import generate_cohort, task_inputs
from multimed.models.cohort.writer import FILES
from multimed.models.modalities.registry import build_pipeline
from multimed.models.outputs import output_of
from multimed.services.export import model_ready

HEADERS = {"authorization": "Bearer integration-secret"}  # conftest's TOKEN
OOD_OUTPUTS = ["ood_score", "ood_flag"]  # per accepted modality (test_out_of_distribution.py)
ENCODERS = [f"encoder_{m}" for m in CATALOG.modalities]
VENV = Path(".venv")
PERF_ANALYZER = VENV / "perf_analyzer" / "bin" / "perf_analyzer"
CUDA_RUNTIME = VENV / "perf_analyzer" / "nvidia" / "cuda_runtime" / "lib"


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def ready(server) -> dict[str, dict[str, np.ndarray]]:
    """Per task, per modality: two synthetic patients' model-ready tensors (a batch of 2)."""
    config = load_bundle(server.bundle).config
    patients = generate_cohort(8, seed=5)
    pipelines = {m: build_pipeline(m, config) for m in CATALOG.modalities}
    out = {}
    for task in CATALOG.tasks:
        requests = [task_inputs(p, task) for p in patients]
        first = requests[0]
        second = next(r for r in requests[1:] if r.keys() == first.keys())  # same inputs
        out[task] = {m: model_ready(pipelines[m], [first[m], second[m]]).numpy() for m in first}
    return out


def tensor(name: str, array: np.ndarray) -> triton.InferInput:
    sent = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    sent.set_data_from_numpy(array)
    return sent


def raw_tensor(folder: Path, modality: str) -> triton.InferInput:
    """The synth file for `modality` as its `<modality>_<form>` BYTES input (batch of 1)."""
    raw = read_input(modality, folder / FILES[modality])
    if raw.form == InputForm.DICOM_SERIES:
        items = raw.data
    elif raw.form == InputForm.GENE_COUNTS:
        items = [json.dumps(raw.data).encode()]
    else:
        items = [raw.data.encode() if isinstance(raw.data, str) else raw.data]
    array = np.empty((1, len(items)), dtype=object)
    array[0, :] = items
    return tensor(f"{modality}_{raw.form}", array)


def error_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_probes_metadata_config_and_index(client):
    assert client.is_server_live() and client.is_server_ready()  # probes need no token
    meta = client.get_server_metadata(headers=HEADERS)
    assert "statistics" in meta.extensions
    index = client.get_model_repository_index(headers=HEADERS)
    assert {m.name for m in index.models} == set(CATALOG.tasks) | set(ENCODERS)
    assert {m.state for m in index.models} == {"READY"}
    for name in [*CATALOG.tasks, *ENCODERS]:
        assert client.is_model_ready(name, headers=HEADERS)
    assert not client.is_model_ready("no_such_model", headers=HEADERS)

    disease = client.get_model_metadata("disease_classification", headers=HEADERS)
    shapes = {t.name: (t.datatype, list(t.shape)) for t in disease.inputs}
    assert shapes["xray"] == ("FP32", [-1, 1, 64, 64])
    assert shapes["ct_dicom_series"] == ("BYTES", [-1, -1])
    assert shapes["text_text"] == ("BYTES", [-1, 1])
    config = client.get_model_config("disease_classification", headers=HEADERS).config
    assert config.max_batch_size > 1 and config.HasField("dynamic_batching")
    assert all(i.optional for i in config.input)
    assert [o.name for o in config.output] == ["scores", "labels", *OOD_OUTPUTS]
    assert json.loads(config.parameters["task"].string_value)["labels"] == list(
        CATALOG.task("disease_classification").labels
    )
    protein = client.get_model_metadata("encoder_protein", headers=HEADERS)
    first = protein.inputs[0]
    assert (first.name, first.datatype, list(first.shape)) == (
        "protein",
        "INT64",
        [-1, -1],
    )
    assert [t.name for t in protein.outputs] == ["embedding", "tokens", "descriptor"]


@pytest.mark.parametrize("task", list(CATALOG.tasks))
def test_every_task_from_model_ready_tensors(client, ready, task):
    spec = CATALOG.task(task)
    kind = output_of(spec)
    result = client.infer(
        task, [tensor(m, a) for m, a in ready[task].items()], headers=HEADERS, request_id="r1"
    )
    assert result.get_response().id == "r1"
    scores = result.as_numpy("scores")
    assert scores.shape[0] == 2
    assert scores.shape[-1] == len(spec.labels) and np.isfinite(scores).all()
    advertised = [o.name for o in client.get_model_metadata(task, headers=HEADERS).outputs]
    if not kind.predicts_labels:  # regression: the values are the scores, named by the config
        assert advertised == ["scores", *OOD_OUTPUTS] and result.as_numpy("labels") is None
        return
    assert advertised == ["scores", "labels", *OOD_OUTPUTS]
    labels = result.as_numpy("labels")
    assert labels.shape[0] == 2
    assert {b.decode() for b in labels.reshape(-1) if b} <= set(spec.labels)
    if spec.output in (OutputKind.SINGLE_LABEL, OutputKind.ANSWER):
        np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-5)
        assert labels.shape == (2, 1)


@pytest.mark.parametrize("modality", list(CATALOG.modalities))
def test_every_encoder_raw_bytes_equals_embed_and_takes_tensors(server, client, ready, modality):
    """The raw file as BYTES gives the multimed.v1 Embed answer; model-ready tensors batch."""
    folder = server.patients[0]
    result = client.infer(f"encoder_{modality}", [raw_tensor(folder, modality)], headers=HEADERS)
    with server.client() as sdk:
        embedded = sdk.embed(modality, folder / FILES[modality])
    want = np.frombuffer(embedded.embedding.data, dtype=np.float32)
    np.testing.assert_allclose(result.as_numpy("embedding")[0], want, atol=1e-6)

    batch = next(r[modality] for r in ready.values() if modality in r)
    result = client.infer(f"encoder_{modality}", [tensor(modality, batch)], headers=HEADERS)
    assert result.as_numpy("embedding").shape == (2, load_bundle(server.bundle).config.embed_dim)
    descriptor = result.as_numpy("descriptor")  # what the OOD score reads besides the embedding
    assert descriptor.shape[0] == 2 and descriptor.shape[1] > 0 and np.isfinite(descriptor).all()
    if CATALOG.modality(modality).emits_tokens:
        assert result.as_numpy("tokens").shape[:2] == batch.shape[:2]


def test_asyncio_client_on_every_task_and_encoder(server, ready):
    async def run():
        async with triton_aio.InferenceServerClient(server.url) as c:
            assert await c.is_server_live() and await c.is_server_ready()
            assert (await c.get_server_metadata(headers=HEADERS)).name == "multimed-serve"
            calls = []
            for task, inputs in ready.items():
                assert (await c.get_model_metadata(task, headers=HEADERS)).name == task
                assert (await c.get_model_config(task, headers=HEADERS)).config.name == task
                calls.append(
                    c.infer(task, [tensor(m, a) for m, a in inputs.items()], headers=HEADERS)
                )
            for m in CATALOG.modalities:
                batch = next(r[m] for r in ready.values() if m in r)
                calls.append(c.infer(f"encoder_{m}", [tensor(m, batch)], headers=HEADERS))
            return await asyncio.gather(*calls)

    results = asyncio.run(run())
    tasks, encoders = results[: len(CATALOG.tasks)], results[len(CATALOG.tasks) :]
    for task, result in zip(CATALOG.tasks.values(), tasks, strict=True):
        scores = result.as_numpy("scores")
        assert scores.shape[0] == 2 and scores.shape[-1] == len(task.labels), task.id
    embed_dim = load_bundle(server.bundle).config.embed_dim
    assert [r.as_numpy("embedding").shape for r in encoders] == [(2, embed_dim)] * len(encoders)


def _xray(shape=(1, 1, 64, 64), dtype=np.float32, value=0.5):
    return np.full(shape, value, dtype=dtype)


BAD = {
    "wrong datatype": (
        lambda: [tensor("xray", _xray(dtype=np.float64))],
        "INVALID_ARGUMENT",
        "input 'xray' has datatype FP64, expected FP32",
    ),
    "wrong shape": (
        lambda: [tensor("xray", _xray(shape=(1, 1, 32, 64)))],
        "INVALID_ARGUMENT",
        "input 'xray' has shape [1, 1, 32, 64], expected [-1, 1, 64, 64]",
    ),
    "missing input": (
        lambda: [],
        "INVALID_ARGUMENT",
        "xray: 'xray' or 'xray_dicom' or 'xray_image'",
    ),
    "unknown input": (
        lambda: [tensor("xray", _xray()), tensor("ct", _xray())],
        "INVALID_ARGUMENT",
        "has no input 'ct'",
    ),
    "NaN": (
        lambda: [tensor("xray", _xray(value=np.nan))],
        "INVALID_ARGUMENT",
        "NaN or Inf values (input 'xray')",
    ),
    "two forms of one modality": (
        lambda: [tensor("xray", _xray()), tensor("xray_dicom", np.array([[b"x"]], dtype=object))],
        "INVALID_ARGUMENT",
        "both carry xray",
    ),
    "corrupt DICOM": (
        lambda: [tensor("xray_dicom", np.array([[b"not a dicom"]], dtype=object))],
        "INVALID_ARGUMENT",
        "(input 'xray_dicom')",
    ),
    "over max_batch_size": (
        lambda: [tensor("xray", _xray(shape=(65, 1, 64, 64)))],
        "INVALID_ARGUMENT",
        "batch size 65",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_name_the_tensor_and_server_keeps_serving(client, ready, case):
    inputs, code, message = BAD[case]
    status, text = error_of(
        lambda: client.infer("bone_age_classification", inputs(), headers=HEADERS)
    )
    assert status == f"StatusCode.{code}" and message in text, text
    good = ready["bone_age_classification"]["xray"]
    assert client.infer("bone_age_classification", [tensor("xray", good)], headers=HEADERS)


def test_protocol_errors_not_found_unimplemented_unauthenticated(client):
    status, text = error_of(lambda: client.get_model_metadata("nope", headers=HEADERS))
    assert status == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in text
    status, text = error_of(
        lambda: client.get_model_config("bone_age_classification", "7", headers=HEADERS)
    )
    assert status == "StatusCode.NOT_FOUND" and "no version '7'" in text
    status, text = error_of(lambda: client.load_model("bone_age_classification", headers=HEADERS))
    assert status == "StatusCode.UNIMPLEMENTED" and "RepositoryModelLoad is not supported" in text
    status, _ = error_of(lambda: client.get_system_shared_memory_status(headers=HEADERS))
    assert status == "StatusCode.UNIMPLEMENTED"
    status, _ = error_of(lambda: client.infer("bone_age_classification", [tensor("xray", _xray())]))
    assert status == "StatusCode.UNAUTHENTICATED"


def test_statistics_count_successes_and_failures(client, ready):
    def stats():
        reply = client.get_inference_statistics("encoder_oct", headers=HEADERS)
        (entry,) = reply.model_stats
        return entry

    before = stats()
    batch = ready["diabetic_retinopathy_classification"]["oct"]
    client.infer("encoder_oct", [tensor("oct", batch)], headers=HEADERS)
    error_of(lambda: client.infer("encoder_oct", [tensor("oct", batch[:, :, :8])], headers=HEADERS))
    after = stats()
    assert after.version == "1"
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 2
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert any(b.batch_size == 2 for b in after.batch_stats)


def _perf_analyzer() -> Path:
    """Installed by `make install` (tritonclient 2.51's binary, apart from the project's own
    tritonclient); it also needs Debian's libb64-0d, which `.ci/run` installs."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(CUDA_RUNTIME.resolve())}
    probe = (
        subprocess.run(
            [PERF_ANALYZER, "--version"], capture_output=True, text=True, env=env, check=False
        )
        if PERF_ANALYZER.exists()
        else None
    )
    if probe is None or probe.returncode != 0:
        why = probe.stderr.strip() if probe else f"{PERF_ANALYZER} missing (make install)"
        if os.environ.get("CI"):
            pytest.fail(f"perf_analyzer cannot run: {why}")
        pytest.skip(f"perf_analyzer cannot run here: {why} (apt-get install libb64-0d)")
    return PERF_ANALYZER


def test_perf_analyzer_runs_to_completion(server, tmp_path):
    """A task of three inputs (X-ray, CT and MRI series) and the note, at 1 and 8 callers."""
    task = "disease_classification"
    binary = _perf_analyzer()
    data = tmp_path / "input.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "multimed.cli",
            "perf-data",
            "--task",
            task,
            "--bundle",
            str(server.bundle),
            "--out",
            str(data),
            "--patients",
            "4",
        ],
        check=True,
        capture_output=True,
    )
    command = [
        binary,
        "-i",
        "grpc",
        "-u",
        server.url,
        "-m",
        task,
        "--concurrency-range",
        "1:8:7",  # 1 and 8: a lone caller and a batching load
        "-H",
        f"authorization:{HEADERS['authorization']}",
        "--input-data",
        str(data),
        # Bounded: fixed-size windows, and a loose stability bar on a shared 2-core machine.
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "40",
        "--stability-percentage",
        "100",
        "--max-trials",
        "6",
    ]
    env = {**os.environ, "LD_LIBRARY_PATH": str(CUDA_RUNTIME.resolve())}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(r"Concurrency: 8, throughput: [\d.]+ infer/sec", run.stdout), run.stdout
    assert "Server:" in run.stdout and "compute infer" in run.stdout  # statistics were read
