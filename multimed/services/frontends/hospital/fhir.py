"""A study's findings as a FHIR R4B transaction bundle for the EHR, and the POST that delivers it.

The bundle holds the ImagingStudy (with its WADO-RS Endpoint), the algorithm as a Device, one
Observation per task and a DiagnosticReport gathering them. The patient is referenced by the DICOM
Patient ID only, as an identifier: no Patient resource is written and no name is ever sent.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from urllib.parse import urlencode

import requests
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.resource import Resource

from multimed.models.catalog import CATALOG, OutputKind
from multimed.models.trust import OodScore
from multimed.services.frontends.hospital.codes import (
    ALGORITHM_NAME,
    FHIR_LABEL_SYSTEM,
    FHIR_TASK_SYSTEM,
    FHIR_TRUST_SYSTEM,
    MANUFACTURER,
    device_uid,
)
from multimed.services.frontends.hospital.findings import StudyFindings, TaskFinding

DICOM_UID_SYSTEM = "urn:dicom:uid"  # FHIR's system for DICOM UIDs, values as urn:oid:<uid>
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"  # DICOM modality codes
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
# No LOINC code names "output of a multi-task AI model", so the report is coded in our own scheme.
REPORT_CODE = "multimed-report"
FHIR_JSON = "application/fhir+json"

LABEL_KINDS = (OutputKind.SINGLE_LABEL, OutputKind.MULTI_LABEL, OutputKind.ANSWER)
RETRY_AFTER_CAP_S = 10.0  # the server waits for the POST in a thread: never park it for long


# --- the bundle -------------------------------------------------------------------------------


def build_bundle(findings: StudyFindings, *, issued: datetime | None = None) -> dict:
    """The findings as a transaction Bundle (FHIR JSON as a dict). `issued` defaults to now."""
    issued = issued or datetime.now(UTC).replace(microsecond=0)
    subject = _patient(findings.patient_id)
    endpoint = _Entry(_endpoint(findings.wado_url))
    study_id = _uid_identifier(findings.study_uid)
    study = _Entry(_imaging_study(findings, subject, endpoint.ref), if_none_exist=study_id)
    device_id = _uid_identifier(device_uid(findings.bundle_version))
    device = _Entry(_device(findings.bundle_version, device_id), if_none_exist=device_id)
    observations = [
        _Entry(_observation(f, subject, study.ref, device.ref, issued)) for f in findings.findings
    ]
    report = _Entry(
        DiagnosticReport(
            status="preliminary",
            code={"coding": [{"system": FHIR_TASK_SYSTEM, "code": REPORT_CODE}]},
            subject=subject,
            issued=issued,
            result=[o.ref for o in observations],
            imagingStudy=[study.ref],
            conclusion=_conclusion(findings.findings),
        )
    )
    entries = [endpoint, study, device, *observations, report]
    bundle = Bundle(type="transaction", entry=[e.entry() for e in entries])
    return bundle.model_dump(mode="json", exclude_none=True)


class _Entry:
    """A resource with its bundle-local fullUrl, which the other entries reference it by."""

    def __init__(self, resource: Resource, *, if_none_exist: dict | None = None):
        self.resource = resource
        self.full_url = f"urn:uuid:{uuid.uuid4()}"
        self.ref = {"reference": self.full_url}
        self.if_none_exist = if_none_exist

    def entry(self) -> dict:
        request = {"method": "POST", "url": self.resource.get_resource_type()}
        if self.if_none_exist is not None:
            # A conditional create: the same study or model sent again is matched by its DICOM
            # UID instead of duplicated, and references to this fullUrl then point at the match.
            token = f"{self.if_none_exist['system']}|{self.if_none_exist['value']}"
            request["ifNoneExist"] = urlencode({"identifier": token})
        return {"fullUrl": self.full_url, "resource": self.resource, "request": request}


def _uid_identifier(uid: str) -> dict:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _patient(patient_id: str) -> dict:
    # A logical reference by identifier, with no system: DICOM Patient ID is unique only within
    # its Issuer of Patient ID, which we do not know, and a system we made up would name a
    # namespace the EHR has never heard of, so its patient match would fail. The value alone lets
    # the EHR resolve it within its own domain (the PACS it shares with us).
    return {"type": "Patient", "identifier": {"value": patient_id}}


def _endpoint(wado_url: str) -> Endpoint:
    return Endpoint(
        status="active",
        connectionType={"system": CONNECTION_TYPE, "code": "dicom-wado-rs"},
        # R4B requires a payloadType; its binding is only an example, so text says it plainly.
        payloadType=[{"text": "DICOM WADO-RS"}],
        payloadMimeType=["application/dicom"],
        address=wado_url,
    )


def _modality(code: str) -> dict:
    return {"system": DCM_SYSTEM, "code": code}


def _imaging_study(findings: StudyFindings, subject: dict, endpoint: dict) -> ImagingStudy:
    identifiers = [_uid_identifier(findings.study_uid)]
    if findings.accession_number:
        acsn = {"coding": [{"system": IDENTIFIER_TYPE, "code": "ACSN"}]}
        identifiers.append({"type": acsn, "value": findings.accession_number})
    series = [
        {
            "uid": s.uid,
            "number": s.number,
            "modality": _modality(s.modality_code),
            "description": s.description or None,  # FHIR forbids empty strings
            "numberOfInstances": s.instances,
        }
        for s in findings.series
    ]
    modalities = dict.fromkeys(s.modality_code for s in findings.series)  # distinct, in order
    return ImagingStudy(
        status="available",
        identifier=identifiers,
        subject=subject,
        endpoint=[endpoint],
        modality=[_modality(m) for m in modalities] or None,
        numberOfSeries=len(series),
        numberOfInstances=sum(s.instances for s in findings.series),
        series=series or None,
    )


def _device(bundle_version: str, identifier: dict) -> Device:
    return Device(
        identifier=[identifier],
        deviceName=[{"name": ALGORITHM_NAME, "type": "model-name"}],
        manufacturer=MANUFACTURER,
        version=[{"value": bundle_version}],
    )


def _number(x: float) -> float:
    # Six significant digits: the models' float32 outputs carry no more, and it keeps the JSON
    # free of 0.10000000149011612-style tails.
    return float(f"{x:.6g}")


def _label(task: str, label: str) -> dict:
    return {"coding": [{"system": f"{FHIR_LABEL_SYSTEM}/{task}", "code": label}], "text": label}


def _observation(
    f: TaskFinding, subject: dict, study: dict, device: dict, issued: datetime
) -> Observation:
    spec = CATALOG.task(f.task)
    value: dict = {}
    components: list[dict] = []
    if f.kind in LABEL_KINDS:
        # One component per label, its probability as a dimensionless UCUM quantity.
        for label, score in zip(f.labels, f.scores, strict=True):
            component = {
                "code": _label(f.task, label),
                "valueQuantity": {
                    "value": _number(score),
                    "unit": "1",
                    "system": UCUM,
                    "code": "1",
                },
            }
            if f.kind is OutputKind.MULTI_LABEL:
                # Each label is its own yes/no finding: say which, where a reader looks for it.
                flag = "POS" if label in f.predicted else "NEG"
                component["interpretation"] = [
                    {"coding": [{"system": INTERPRETATION, "code": flag}]}
                ]
            components.append(component)
        if f.kind is OutputKind.MULTI_LABEL:
            # Several findings are not one concept: codings in one CodeableConcept would claim they
            # are translations of each other. The value names them in text; components code them.
            value["valueCodeableConcept"] = {"text": ", ".join(f.predicted) or "none predicted"}
        elif f.predicted:
            value["valueCodeableConcept"] = _label(f.task, f.predicted[0])
    elif f.kind is OutputKind.REGRESSION:
        # The predicted values are on the model's own scale (no UCUM unit fits): value only.
        components = [
            {"code": _label(f.task, label), "valueQuantity": {"value": _number(v)}}
            for label, v in zip(f.labels, f.scores, strict=True)
        ]
    elif f.kind is OutputKind.PER_TOKEN and f.predicted:
        # One label per token, as one string: single-character labels (H/E/C secondary structure)
        # read as the familiar DSSP-style string, longer labels are space-separated.
        sep = "" if all(len(label) == 1 for label in f.labels) else " "
        value["valueString"] = sep.join(f.predicted)
    components += [_trust(m, o) for m, o in f.out_of_distribution.items()]
    if f.untrusted:
        # A reader must see it before the value: the model never saw inputs like these.
        value["interpretation"] = [{"text": _untrusted(f)}]
        value["note"] = [{"text": _untrusted(f) + "; do not rely on this result"}]
    return Observation(
        status="preliminary",
        category=[{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging"}]}],
        code={
            "coding": [{"system": FHIR_TASK_SYSTEM, "code": f.task, "display": spec.description}]
        },
        subject=subject,
        issued=issued,
        derivedFrom=[study],
        device=device,
        component=components or None,
        **value,
    )


def _trust(modality: str, o: OodScore) -> dict:
    """One used modality's out-of-distribution score, its threshold as the reference range."""
    return {
        "code": {
            "coding": [
                {"system": FHIR_TRUST_SYSTEM, "code": f"out-of-distribution-score/{modality}"}
            ],
            "text": f"{modality} out-of-distribution score",
        },
        "valueQuantity": {"value": _number(o.score), "unit": "1", "system": UCUM, "code": "1"},
        "referenceRange": [{"high": {"value": _number(o.threshold)}}],
        "interpretation": [{"text": "out of distribution" if o.flagged else "in distribution"}],
    }


def _untrusted(f: TaskFinding) -> str:
    return f"input out of distribution ({', '.join(f.untrusted)})"


def _summary(f: TaskFinding) -> str:
    if f.kind is OutputKind.REGRESSION:
        return ", ".join(f"{label} {v:.3g}" for label, v in zip(f.labels, f.scores, strict=True))
    if f.kind is OutputKind.PER_TOKEN:
        return f"{len(f.predicted)} tokens labelled"
    if f.kind is OutputKind.MULTI_LABEL:
        return ", ".join(f.predicted) or "none predicted"
    return f.predicted[0] if f.predicted else "no answer"


def _conclusion(findings: tuple[TaskFinding, ...]) -> str | None:
    return (
        "; ".join(
            f"{f.task}: {_summary(f)}" + (f" ({_untrusted(f)})" if f.untrusted else "")
            for f in findings
        )
        or None
    )


# --- delivery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FhirOutcome:
    """How a POST went. `message` names a status or an exception class, never the bundle."""

    sent: bool
    status: int | None
    attempts: int
    message: str


def _status_line(status: int) -> str:
    # The standard phrase, not the server's: its reason text is not ours to repeat in our logs.
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds when it is a number (an HTTP date is ignored), capped."""
    value = response.headers.get("Retry-After", "").strip()
    return min(float(value), RETRY_AFTER_CAP_S) if value.isdigit() else None


def post_bundle(
    url: str,
    bundle: dict,
    *,
    token: str | None,
    timeout_s: float,
    attempts: int = 4,
    backoff_s: float = 0.5,
) -> FhirOutcome:
    """POST a transaction bundle to the FHIR base `url`. Retries connection failures, timeouts,
    429 and 5xx with exponential backoff; any other answer is final. Never raises for HTTP
    trouble: the outcome says what happened."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    body = json.dumps(bundle).encode()
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    message = ""
    status: int | None = None
    for attempt in range(1, attempts + 1):
        wait = backoff_s * 2 ** (attempt - 1)
        try:
            # No redirects: a transaction must reach the server we were configured with, and a
            # followed 301/302 would turn the POST into a GET anyway.
            response = requests.post(
                url, data=body, headers=headers, timeout=timeout_s, allow_redirects=False
            )
        except (requests.ConnectionError, requests.Timeout) as e:
            status, message = None, type(e).__name__
        except requests.RequestException as e:  # a bad URL and the like: retrying cannot help
            return FhirOutcome(False, None, attempt, f"not sent: {type(e).__name__}")
        else:
            status, message = response.status_code, _status_line(response.status_code)
            if 200 <= status < 300:
                return FhirOutcome(True, status, attempt, f"sent: {message}")
            if status != 429 and status < 500:
                return FhirOutcome(False, status, attempt, f"not sent: {message}")
            wait = max(wait, _retry_after(response) or 0.0)
        if attempt < attempts:
            time.sleep(wait)
    return FhirOutcome(False, status, attempts, f"not sent after {attempts} attempts: {message}")
