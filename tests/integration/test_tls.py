"""TLS and mTLS at the listener, named tokens, certificate reload and the audit log, against a
real `multimed serve` started with --tls-cert/--tls-key/--tls-client-ca. Certificates are made
here with `cryptography`: a CA, the server's, a client's, and one from an untrusted CA."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from certs import authority
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from servers import TOKEN, StreamMetadata, running_server, serve_config

from multimed.client import MultiMedClient
from multimed.models.catalog import InputForm
from multimed.models.inputs import RawInput
from multimed.services.server import wait_serving
from multimed.v1 import multimed_pb2 as pb

PATIENT = "Jane-Q-Doe-MRN-0047113"  # must appear in no log
TASK = "bone_age_classification"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ca = authority(out, "hospital-ca")
    return {
        "out": out,
        "ca": ca,
        "server": ca.issue(out, "server", server=True),
        "client": ca.issue(out, "radiology-pacs", server=False),
        "rogue": authority(out / "rogue", "rogue-ca").issue(out / "rogue", "rogue", server=False),
    }


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, bundle, pki):
    """-> (url, audit log path, serve log path)."""
    work = tmp_path_factory.mktemp("tls")
    config = serve_config(work / "serve_config.yaml", bundle, deployed=set())  # one process
    audit = work / "audit.jsonl"
    extra = (
        "--tls-cert",
        str(pki["server"].cert),
        "--tls-key",
        str(pki["server"].key),
        "--tls-client-ca",
        str(pki["ca"].path),
        "--audit-log",
        str(audit),
    )

    def wait(url, process, log):
        credentials = grpc.ssl_channel_credentials(
            pki["ca"].path.read_bytes(),
            pki["client"].key.read_bytes(),
            pki["client"].cert.read_bytes(),
        )
        wait_serving(url, 420, alive=lambda: process.poll() is None, credentials=credentials)

    with running_server(work, config, extra=extra, wait=wait) as (url, _, _):
        yield url, audit, work / "serve.log"


def _client(url, pki, cert="client", ca=None) -> MultiMedClient:
    pair = pki[cert] if cert else None
    return MultiMedClient(
        url,
        token=TOKEN,
        tls_ca=ca or pki["ca"].path,
        tls_cert=pair and pair.cert,
        tls_key=pair and pair.key,
    )


def _xray(seed: int) -> RawInput:
    image = np.random.default_rng(seed).random((1, 64, 64), dtype=np.float32)
    return RawInput("xray", InputForm.TENSOR, image)


def test_mtls_call_health_and_reflection_on_one_port(tls_server, pki):
    url, _, _ = tls_server
    with _client(url, pki) as client:
        response = client.predict(TASK, {"xray": _xray(1)})
        assert response.predicted[0] in [s.label for s in response.scores]
        health = health_pb2_grpc.HealthStub(client.channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        bearer = (("authorization", f"Bearer {TOKEN}"),)  # tokens are on: reflection needs one
        reflected = grpc.intercept_channel(client.channel, StreamMetadata(bearer))
        assert "multimed.v1.MultiMed" in ProtoReflectionDescriptorDatabase(reflected).get_services()


def test_plaintext_to_the_tls_port_fails(tls_server):
    url, _, _ = tls_server
    with grpc.insecure_channel(url) as channel, pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("cert", [None, "rogue"])
def test_mtls_without_or_with_a_wrong_client_certificate_fails_the_handshake(tls_server, pki, cert):
    url, _, _ = tls_server
    with _client(url, pki, cert=cert) as client, pytest.raises(grpc.RpcError) as caught:
        client.catalog(timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_wrong_token_is_refused_over_mtls(tls_server, pki):
    url, _, _ = tls_server
    with _client(url, pki) as client, pytest.raises(grpc.RpcError) as caught:
        client.stub.GetCatalog(
            pb.GetCatalogRequest(),
            metadata=(("authorization", "Bearer not-the-token"),),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tritonclient_with_ssl(tls_server, pki):
    url, _, _ = tls_server
    client = triton.InferenceServerClient(
        url,
        ssl=True,
        root_certificates=str(pki["ca"].path),
        private_key=str(pki["client"].key),
        certificate_chain=str(pki["client"].cert),
    )
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert client.is_server_ready(headers=headers)
    x = triton.InferInput("xray", [1, 1, 64, 64], "FP32")
    x.set_data_from_numpy(_xray(2).data[None])
    result = client.infer(TASK, [x], headers=headers)
    assert result.as_numpy("scores").shape == (1, 4)
    client.close()


def test_audit_log_names_the_caller_and_carries_no_patient_data(tls_server, pki):
    url, audit, serve_log = tls_server
    started = time.time()
    with _client(url, pki) as client:
        client.predict(
            "disease_classification",
            {"xray": _xray(3), "text": f"Patient {PATIENT}: cough, fever."},
            request_id="audit-ok-1",
        )
        with pytest.raises(grpc.RpcError):  # an error must not quote the patient either
            client.predict(
                TASK, {"xray": _xray(4), "text": f"{PATIENT} note"}, request_id="audit-err-2"
            )
        with pytest.raises(grpc.RpcError):  # a modality name the catalog does not know
            request = pb.PredictRequest(
                request_id="audit-bad-3",
                task=TASK,
                inputs=[pb.ModalityInput(modality=PATIENT, text="x")],
            )
            client.stub.Predict(request, metadata=client.metadata, timeout=30)
    wanted = {"audit-ok-1", "audit-err-2", "audit-bad-3"}
    deadline = time.time() + 10  # the file handler writes as each call ends
    by_id: dict = {}
    while time.time() < deadline and set(by_id) != wanted:
        lines = [json.loads(x) for x in audit.read_text().splitlines()]
        by_id = {line["request_id"]: line for line in lines if line["request_id"] in wanted}
        time.sleep(0.2)
    ok = by_id["audit-ok-1"]
    assert ok["caller"] == "token:integration"  # the token's name; no token: the cert subject
    assert (ok["method"], ok["task"], ok["code"]) == ("Predict", "disease_classification", "OK")
    assert ok["modalities"] == ["text", "xray"] and ok["latency_ms"] > 0
    assert by_id["audit-err-2"]["code"] == "INVALID_ARGUMENT"  # the task takes no text
    assert by_id["audit-bad-3"]["modalities"] == ["unknown"]
    assert by_id["audit-bad-3"]["code"] == "INVALID_ARGUMENT"
    logs = [audit, serve_log, *_ray_logs(started)]
    leaked = [str(p) for p in logs if PATIENT.encode() in p.read_bytes()]
    assert not leaked


def _ray_logs(since: float) -> list[Path]:
    """Every Ray log file written to since the test began (any session on this host)."""
    root = Path("/tmp/ray")
    if not root.exists():
        return []
    return [
        p
        for p in root.glob("session_*/logs/**/*")
        if p.is_file() and not p.is_symlink() and p.stat().st_mtime >= since - 1
    ]


def test_certificates_reload_without_a_restart(tls_server, pki):
    """New server certificate files (from another CA) are served at the next handshake."""
    url, _, _ = tls_server
    out: Path = pki["out"] / "rotated"
    new_ca = authority(out, "new-ca")
    rotated = new_ca.issue(out, "server", server=True)
    for src, dst in ((rotated.cert, pki["server"].cert), (rotated.key, pki["server"].key)):
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)
    with _client(url, pki, ca=new_ca.path) as client:
        assert client.catalog(timeout=10).tasks
    with _client(url, pki) as client, pytest.raises(grpc.RpcError):
        client.catalog(timeout=5)  # the old CA no longer verifies the server
