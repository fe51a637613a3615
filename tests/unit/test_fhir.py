"""The FHIR writer: the bundle parses as R4B and keeps the bindings fhir.resources does not check;
the POST retries what is worth retrying, against a real local HTTP server."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.uid import UID

from multimed.models.catalog import CATALOG, OutputKind
from multimed.models.trust import OodScore
from multimed.services.frontends.hospital import fhir
from multimed.services.frontends.hospital.codes import (
    FHIR_LABEL_SYSTEM,
    FHIR_TASK_SYSTEM,
    FHIR_TRUST_SYSTEM,
)
from multimed.services.frontends.hospital.fhir import FhirOutcome, build_bundle, post_bundle
from multimed.services.frontends.hospital.findings import SeriesRef, StudyFindings, TaskFinding

PATIENT_ID = "PID-7731-QX"  # distinctive, so any leak of it is found by a plain search
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = STUDY_UID + ".1"

# The R4 value sets of the bound codes (required bindings), which the library leaves unchecked.
BUNDLE_TYPES = {"transaction"}
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}
STUDY_STATUS = {"registered", "available", "cancelled", "entered-in-error", "unknown"}
OBSERVATION_STATUS = {
    *("registered", "preliminary", "final", "amended", "corrected", "cancelled"),
    *("entered-in-error", "unknown"),
}
REPORT_STATUS = {
    *("registered", "partial", "preliminary", "final", "amended", "corrected", "appended"),
    *("cancelled", "entered-in-error", "unknown"),
}
ENDPOINT_STATUS = {"active", "suspended", "error", "off", "entered-in-error", "test"}
CONNECTION_TYPES = {
    *("ihe-xcpd", "ihe-xca", "ihe-xdr", "ihe-xds", "ihe-iid", "dicom-wado-rs", "dicom-qido-rs"),
    *("dicom-stow-rs", "dicom-wado-uri", "hl7-fhir-rest", "hl7-fhir-msg", "hl7v2-mllp"),
    *("secure-email", "direct-project"),
}


def _finding(task: str, scores: tuple[float, ...], predicted: tuple[str, ...]) -> TaskFinding:
    spec = CATALOG.task(task)
    return TaskFinding(task, spec.output, spec.labels, scores, predicted, ("xray",), (SERIES_UID,))


FINDINGS = StudyFindings(
    study_uid=STUDY_UID,
    patient_id=PATIENT_ID,
    accession_number="ACC-42",
    bundle_version="2024.06.1",
    wado_url="https://pacs.example.org/dicomweb",
    findings=(
        _finding("disease_classification", (0.1, 0.7, 0.15, 0.05), ("infection",)),
        _finding(
            "radiographic_findings_classification",
            (0.2, 0.8, 0.6, 0.1, 0.05),
            ("effusion", "nodule"),
        ),
        _finding("expression_prediction", (1.5, -0.25, 0.0, 2.0, 0.5, 0.1, 0.3, 0.9), ()),
        _finding("protein_structure_prediction", (), ("H", "H", "E", "C")),
        _finding("medical_vqa", (0.9, 0.02, 0.02, 0.02, 0.02, 0.02), ("yes",)),
    ),
    series=(
        SeriesRef(SERIES_UID, "DX", 1, "PA chest", 1),
        SeriesRef(STUDY_UID + ".2", "SR", None, "", 1),
    ),
)


@pytest.fixture(scope="module")
def bundle() -> dict:
    return build_bundle(FINDINGS)


def _resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _strings(node: object, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in the JSON with its path, e.g. ('entry.resource.subject.identifier.value',
    'PID-7731-QX'); list indexes are left out of the path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, path)
    elif isinstance(node, str):
        yield path, node


def _uid_value(identifier: dict) -> str:
    assert identifier["system"] == "urn:dicom:uid"
    assert identifier["value"].startswith("urn:oid:")
    uid = identifier["value"].removeprefix("urn:oid:")
    assert UID(uid).is_valid, uid
    return uid


def test_bundle_parses_back_as_r4b(bundle):
    parsed = Bundle.model_validate(bundle)
    assert parsed.type == "transaction"
    assert json.loads(json.dumps(bundle)) == bundle  # plain JSON, nothing left to serialise
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert sorted(set(kinds)) == [
        "Device",
        "DiagnosticReport",
        "Endpoint",
        "ImagingStudy",
        "Observation",
    ]
    assert kinds.count("Observation") == len(FINDINGS.findings)


def test_bindings_and_references(bundle):
    assert bundle["type"] in BUNDLE_TYPES
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls)
    assert all(u.startswith("urn:uuid:") for u in full_urls)
    for e in bundle["entry"]:
        assert e["request"]["method"] in METHODS
        assert e["request"]["url"] == e["resource"]["resourceType"]
    references = [v for p, v in _strings(bundle) if p.endswith(".reference")]
    assert references and all(r in full_urls for r in references)

    (study,) = _resources(bundle, "ImagingStudy")
    assert study["status"] in STUDY_STATUS
    (endpoint,) = _resources(bundle, "Endpoint")
    assert endpoint["status"] in ENDPOINT_STATUS
    assert endpoint["connectionType"]["code"] in CONNECTION_TYPES
    assert endpoint["payloadType"] and endpoint["address"] == FINDINGS.wado_url
    for obs in _resources(bundle, "Observation"):
        assert obs["status"] in OBSERVATION_STATUS
    (report,) = _resources(bundle, "DiagnosticReport")
    assert report["status"] in REPORT_STATUS


def test_identifiers_are_dicom_uids(bundle):
    (study,) = _resources(bundle, "ImagingStudy")
    assert _uid_value(study["identifier"][0]) == STUDY_UID
    assert study["identifier"][1]["value"] == "ACC-42"
    assert [s["uid"] for s in study["series"]] == [s.uid for s in FINDINGS.series]
    assert [s["modality"]["code"] for s in study["series"]] == ["DX", "SR"]
    assert "description" not in study["series"][1]  # empty is left out, not sent as ""
    (device,) = _resources(bundle, "Device")
    _uid_value(device["identifier"][0])
    assert device["version"] == [{"value": "2024.06.1"}]
    assert device["deviceName"][0]["type"] == "model-name"


def test_patient_is_an_identifier_only(bundle):
    text = json.dumps(bundle)
    assert "Patient" not in {e["resource"]["resourceType"] for e in bundle["entry"]}
    holders = {p for p, v in _strings(bundle) if PATIENT_ID in v}
    assert holders == {"entry.resource.subject.identifier.value"}
    assert text.count(PATIENT_ID) == 1 + len(FINDINGS.findings) + 1  # study, observations, report
    # The only names in the bundle are the algorithm's.
    names = {p for p in (p for p, _ in _strings(bundle)) if p.rsplit(".", 1)[-1] == "name"}
    assert names == {"entry.resource.deviceName.name"}


def test_observations_carry_the_answers(bundle):
    by_task = {o["code"]["coding"][0]["code"]: o for o in _resources(bundle, "Observation")}
    url = {e["resource"]["resourceType"]: e["fullUrl"] for e in bundle["entry"]}
    for obs in by_task.values():
        assert obs["code"]["coding"][0]["system"] == FHIR_TASK_SYSTEM
        assert obs["device"]["reference"] == url["Device"]
        assert obs["derivedFrom"] == [{"reference": url["ImagingStudy"]}]

    single = by_task["disease_classification"]
    system = f"{FHIR_LABEL_SYSTEM}/disease_classification"
    assert single["valueCodeableConcept"]["coding"] == [{"system": system, "code": "infection"}]
    scores = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in single["component"]}
    assert scores["infection"] == {
        "value": 0.7,
        "unit": "1",
        "system": "http://unitsofmeasure.org",
        "code": "1",
    }

    multi = by_task["radiographic_findings_classification"]
    flags = {
        c["code"]["coding"][0]["code"]: c["interpretation"][0]["coding"][0]["code"]
        for c in multi["component"]
    }
    assert flags == {
        "cardiomegaly": "NEG",
        "effusion": "POS",
        "nodule": "POS",
        "consolidation": "NEG",
        "fracture": "NEG",
    }
    assert multi["valueCodeableConcept"] == {"text": "effusion, nodule"}

    regression = by_task["expression_prediction"]
    assert [c["valueQuantity"]["value"] for c in regression["component"]][:2] == [1.5, -0.25]
    assert by_task["protein_structure_prediction"]["valueString"] == "HHEC"
    assert "component" not in by_task["protein_structure_prediction"]
    assert by_task["medical_vqa"]["valueCodeableConcept"]["coding"][0]["code"] == "yes"

    (report,) = _resources(bundle, "DiagnosticReport")
    assert len(report["result"]) == len(by_task)
    assert "disease_classification: infection" in report["conclusion"]
    assert "protein_structure_prediction: 4 tokens labelled" in report["conclusion"]
    assert report["issued"]


def test_every_output_kind_is_covered():
    assert {f.kind for f in FINDINGS.findings} == set(OutputKind)


# --- delivery against a local HTTP server -----------------------------------------------------


class _Server:
    """Answers each POST with the next scripted status; records what arrived."""

    def __init__(self, statuses: list[int], headers: dict[str, str] | None = None):
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.received.append((dict(self.headers), body))
                self.send_response(server.statuses.pop(0))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _post(url: str, bundle: dict, **kwargs: object) -> FhirOutcome:
    return post_bundle(url, bundle, token="tok-1", timeout_s=2.0, backoff_s=0.01, **kwargs)


def test_post_retries_a_503_then_sends(bundle):
    with _Server([503, 200]) as server:
        outcome = _post(server.url, bundle)
    assert outcome == FhirOutcome(True, 200, 2, "sent: HTTP 200 OK")
    headers, body = server.received[-1]
    assert json.loads(body) == bundle
    assert headers["Authorization"] == "Bearer tok-1"
    assert headers["Content-Type"] == "application/fhir+json"


def test_post_does_not_retry_a_400(bundle):
    with _Server([400]) as server:
        outcome = _post(server.url, bundle)
    assert outcome == FhirOutcome(False, 400, 1, "not sent: HTTP 400 Bad Request")
    assert len(server.received) == 1


def test_post_honours_a_capped_retry_after(bundle, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(fhir.time, "sleep", waits.append)
    with _Server([429, 429, 200], {"Retry-After": "3600"}) as server:
        outcome = _post(server.url, bundle)
    assert outcome.sent and outcome.attempts == 3
    assert waits == [fhir.RETRY_AFTER_CAP_S] * 2


def test_post_to_nothing_listening_gives_up_without_quoting(bundle):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    outcome = _post(f"http://127.0.0.1:{port}/fhir", bundle, attempts=3)
    assert time.monotonic() - start < 2.0
    assert outcome == FhirOutcome(False, None, 3, "not sent after 3 attempts: ConnectionError")
    assert PATIENT_ID not in outcome.message and STUDY_UID not in outcome.message


def test_an_out_of_distribution_input_is_said_before_the_value():
    """Each used modality's score is a component with its threshold as the reference range; a
    flagged one also sets the interpretation, a note and the report's conclusion."""
    trust = {
        "xray": OodScore(9.4, 2.7, True),
        "text": OodScore(0.8, 1.1, False),
    }
    finding = replace(FINDINGS.findings[0], out_of_distribution=trust)
    bundle = build_bundle(replace(FINDINGS, findings=(finding,)))
    Bundle.model_validate(bundle)
    (observation,) = _resources(bundle, "Observation")
    scores = {
        c["code"]["coding"][0]["code"]: c
        for c in observation["component"]
        if c["code"]["coding"][0]["system"] == FHIR_TRUST_SYSTEM
    }
    xray = scores["out-of-distribution-score/xray"]
    assert xray["valueQuantity"]["value"] == pytest.approx(9.4)
    assert xray["referenceRange"][0]["high"]["value"] == pytest.approx(2.7)
    assert xray["interpretation"][0]["text"] == "out of distribution"
    assert scores["out-of-distribution-score/text"]["interpretation"][0]["text"] == (
        "in distribution"
    )
    assert observation["interpretation"][0]["text"] == "input out of distribution (xray)"
    assert "do not rely on this result" in observation["note"][0]["text"]
    (report,) = _resources(bundle, "DiagnosticReport")
    assert "input out of distribution (xray)" in report["conclusion"]


def test_an_in_distribution_answer_carries_no_warning(bundle):
    for observation in _resources(bundle, "Observation"):
        assert "interpretation" not in observation and "note" not in observation
