"""Bombs and huge requests against the real server: every bomb class is refused with
INVALID_ARGUMENT naming its limit, and the server's memory afterwards is back within 10 % of
before; health answers within 100 ms while huge requests are read."""

from __future__ import annotations

import struct
import threading
import time

import grpc
import pytest
from bombs import deflate_bomb, resample_bomb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from load import SCRNA_TASK, XRAY_TASK
from servers import rss_bytes, session_processes
from tritonclient.grpc import service_pb2 as oip

from multimed.client.sdk import predict_request
from multimed.models.catalog import InputForm
from multimed.models.inputs import RawInput

F = InputForm
SETTLE_S = 3  # for freed memory to go back (replicas' malloc trims past 64 MiB)


def _bombs() -> dict[str, tuple[str, RawInput, str]]:
    """name -> (task, input, what the refusal names); each fits the tests' 4 MB messages."""
    return {
        "deflated DICOM (80 MiB inflated)": (
            XRAY_TASK,
            RawInput("xray", F.DICOM, deflate_bomb()),
            "inflate",
        ),
        "EDF resampled to 1.2e8 values": (
            "motor_imagery_classification",
            RawInput("eeg", F.EDF, resample_bomb()),
            "resampled",
        ),
        "3.5 MB of bad protein letters": (
            "protein_structure_prediction",
            RawInput("protein", F.SEQUENCE, "Z" * (7 * 2**19)),
            "maximum length",
        ),
        "200,000-gene count map": (
            SCRNA_TASK,
            RawInput("scrna", F.GENE_COUNTS, {f"G{i}": 1.0 for i in range(200_000)}),
            "limit",
        ),
    }


def test_refused_bombs_leave_the_servers_memory_where_it_was(server):
    pids = session_processes(server.process.pid)
    with server.client() as client:
        client.predict(XRAY_TASK, {"xray": server.patients[0] / "xray.dcm"})  # warm
        time.sleep(SETTLE_S)
        before = rss_bytes(pids)
        for name, (task, raw, named) in _bombs().items():
            with pytest.raises(grpc.RpcError) as refused:
                client.predict(task, {raw.modality: raw}, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert named in refused.value.details(), (name, refused.value.details())
        time.sleep(SETTLE_S)
        after = rss_bytes(pids)
    print(
        f"server memory before the bombs {before / 2**20:.0f} MiB, after "
        f"{after / 2**20:.0f} MiB ({after / before - 1:+.1%})"
    )
    assert after < before * 1.10


def _huge_bodies() -> list[tuple[str, bytes, grpc.StatusCode]]:
    """(method, body, refused with): bodies near the tests' 4 MB message limit that are costly
    to parse (the BYTES one is refused by item admission: 900,000 items at once)."""
    counts = RawInput("scrna", F.GENE_COUNTS, {f"G{i}": 1.0 for i in range(200_000)})
    predict = predict_request(SCRNA_TASK, {"scrna": counts}).SerializeToString()
    infer = oip.ModelInferRequest(model_name="encoder_text")
    infer.inputs.add(name="text_text", datatype="BYTES", shape=[900_000])
    infer.raw_input_contents.append(struct.pack("<I", 0) * 900_000)  # 900,000 empty strings
    parameters = oip.ModelInferRequest(model_name="encoder_text")
    for i in range(200_000):
        parameters.parameters[f"p{i}"].bool_param = True
    infer_method = "/inference.GRPCInferenceService/ModelInfer"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("/multimed.v1.MultiMed/Predict", predict, invalid),
        (infer_method, infer.SerializeToString(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (infer_method, parameters.SerializeToString(), invalid),
    ]


def test_health_answers_within_100_ms_while_huge_requests_are_read(server):
    bodies = _huge_bodies()
    latencies: list[float] = []
    done = threading.Event()

    def probe():
        with grpc.insecure_channel(server.url) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            check(health_pb2.HealthCheckRequest(), timeout=5)
            while not done.is_set():
                started = time.perf_counter()
                check(health_pb2.HealthCheckRequest(), timeout=5)
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    metadata = (("authorization", f"Bearer {server.token}"),)
    options = [("grpc.max_send_message_length", 8 << 20)]
    try:
        time.sleep(0.5)
        with grpc.insecure_channel(server.url, options=options) as channel:
            for _ in range(3):
                calls = [
                    channel.unary_unary(method).future(body, timeout=60, metadata=metadata)
                    for method, body, _ in bodies
                ]
                codes = [c.exception() and c.exception().code() for c in calls]
                assert codes == [code for _, _, code in bodies], codes
    finally:
        done.set()
        prober.join()
    worst = max(latencies) * 1000
    print(f"health during huge requests: {len(latencies)} checks, worst {worst:.0f} ms")
    assert len(latencies) > 20
    assert worst < 100
