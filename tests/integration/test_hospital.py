"""The hospital door against a real PACS: the synthetic cohort stored in Orthanc by `multimed pacs
upload` (STOW-RS), studies answered by PredictStudy (QIDO-RS, WADO-RS), the SR read back from
Orthanc over DICOMweb and parsed with highdicom, the FHIR bundle checked as R4B, and every error
case a hospital would meet."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import grpc
import highdicom as hd
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from fhir.resources.R4B.bundle import Bundle
from hospital import REFUSE_SR_ACCESSION, study_uid, upload
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from multimed.models.catalog import CATALOG
from multimed.models.codecs.dicom import to_bytes
from multimed.services.frontends.hospital.codes import DICOM_SCHEME, device_uid
from multimed.services.frontends.hospital.sr import OUT_OF_DISTRIBUTION

IMAGING_TASKS = {
    "disease_classification",
    "brain_tumor_classification",
    "breast_cancer_classification",
    "radiographic_findings_classification",
    "bone_age_classification",
    "diabetic_retinopathy_classification",
}


def dicomweb(orthanc) -> DICOMwebClient:
    session = create_session_from_user_pass(orthanc.username, orthanc.password)
    return DICOMwebClient(orthanc.dicomweb, session=session)


@pytest.fixture(scope="module")
def uploaded(server, orthanc, tmp_path_factory):
    """The session cohort, stored in Orthanc: one study per patient."""
    done = upload(orthanc, server.cohort, tmp_path_factory.mktemp("upload"))
    assert done.returncode == 0, done.stderr
    return done


def test_upload_stores_one_study_per_patient(server, orthanc, uploaded):
    files = sum(1 for p in server.cohort.rglob("*.dcm"))
    assert f"stored {files} instances in main; 0 refused" in uploaded.stdout
    studies = {
        orthanc.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]
        for s in orthanc.get("/studies")
    }
    assert {study_uid(p) for p in server.patients} <= studies
    series = dicomweb(orthanc).search_for_series(study_uid(server.patients[0]))
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert modalities == ["CT", "DX", "MR", "OPT", "SM"]


def test_study_answers_every_task_it_supports(server, uploaded, fhir):
    receiver, _ = fhir
    patient = server.patients[0]
    question = (patient / "question.txt").read_text()
    with server.client() as client:
        response = client.predict_study("main", study_uid(patient), inputs={"text": question})
        direct = client.predict(
            "disease_classification",
            {
                "xray": patient / "xray.dcm",
                "ct": patient / "ct",
                "mri": patient / "mri",
                "text": question,
            },
        )
    answered = {a.prediction.task for a in response.answers}
    assert answered == IMAGING_TASKS | {"medical_vqa"}
    assert not response.skipped  # every task that reads imaging was answerable
    used = {s.series_instance_uid: s.modality for s in response.series}
    assert sorted(used.values()) == ["ct", "mri", "oct", "pathology", "xray"]
    disease = next(a for a in response.answers if a.prediction.task == "disease_classification")
    assert {used[u] for u in disease.series_instance_uids} == {"xray", "ct", "mri"}
    # The same inputs sent to Predict give the same answer: the door adds no preprocessing.
    assert list(disease.prediction.predicted) == list(direct.predicted)
    for a, b in zip(disease.prediction.scores, direct.scores, strict=True):
        assert a.label == b.label and a.score == pytest.approx(b.score, abs=1e-5)
    # FHIR: returned, and POSTed to the configured endpoint with its token.
    assert response.fhir.sent and response.fhir.http_status == 200
    bundle = Bundle.model_validate(json.loads(response.fhir_bundle))
    assert bundle.type == "transaction"
    assert receiver.received[-1] == (f"Bearer {receiver.token}", json.loads(response.fhir_bundle))
    observations = [
        e.resource for e in bundle.entry if e.resource.__resource_type__ == "Observation"
    ]
    assert sorted(o.code.coding[0].code for o in observations) == sorted(answered)
    assert all(o.status == "preliminary" for o in observations)
    assert all(o.subject.identifier.value == patient.name for o in observations)


def test_fhir_post_is_retried(server, uploaded, fhir):
    receiver, _ = fhir
    receiver.fail_next = 1
    with server.client() as client:
        response = client.predict_study(
            "main", study_uid(server.patients[1]), tasks=["bone_age_classification"]
        )
    assert response.fhir.sent and response.fhir.attempts == 2


def test_sr_is_stored_into_the_study_and_reads_back(server, orthanc, uploaded):
    uid = study_uid(server.patients[2])
    with server.client() as client:
        response = client.predict_study(
            "main",
            uid,
            tasks=["disease_classification", "bone_age_classification"],
            store_sr=True,
        )
        version = client.model_info().bundle_version
    assert response.sr.stored, response.sr.message
    web = dicomweb(orthanc)
    (sr_series,) = web.search_for_series(uid, search_filters={"Modality": "SR"})
    assert sr_series["0020000E"]["Value"][0] == response.sr.series_instance_uid
    (raw,) = web.retrieve_series(uid, response.sr.series_instance_uid)
    sr = hd.sr.srread(io.BytesIO(to_bytes(raw)))
    assert sr.VerificationFlag == "UNVERIFIED"
    assert "AI" in sr.SeriesDescription
    assert sr.StudyInstanceUID == uid and sr.PatientID == server.patients[2].name
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if "DeviceUID" in e]
    assert equipment.DeviceUID == device_uid(version) and equipment.SoftwareVersions == version
    coded = [
        (_code(item.ConceptNameCodeSequence[0]), _code(item.ConceptCodeSequence[0]))
        for item in _items(sr)
        if item.ValueType == "CODE"
        and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == DICOM_SCHEME
    ]
    evaluations = {name: value for name, value in coded if name != OUT_OF_DISTRIBUTION}
    predicted = {a.prediction.task: a.prediction.predicted[0] for a in response.answers}
    assert set(evaluations) == set(predicted)
    for task, label in evaluations.items():
        assert label == predicted[task] and label in CATALOG.task(task).labels
    # Inputs flagged out of distribution (the suite's one-epoch bundle flags some) are named.
    ood = [a.prediction.out_of_distribution for a in response.answers]
    flagged = {m for scores in ood for m, o in scores.items() if o.flagged}
    assert {value for name, value in coded if name == OUT_OF_DISTRIBUTION} == flagged


def _code(concept) -> str:
    return concept.get("LongCodeValue") or concept.CodeValue


def _items(ds):
    for item in ds.get("ContentSequence", ()):
        yield item
        yield from _items(item)


def test_unknown_pacs_and_study(server, uploaded):
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as e:
            client.predict_study("elsewhere", study_uid(server.patients[0]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown PACS 'elsewhere'; configured: down, main, slow" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            client.predict_study("main", generate_uid())
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # Not a UID (it would steer the PACS URL): refused before any request to the PACS.
        for bad in ("../../instances", "1.2.3?x=1", "1." + "2" * 80, ""):
            with pytest.raises(grpc.RpcError) as e:
                client.predict_study("main", bad)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a DICOM UID" in e.value.details()


@pytest.mark.parametrize("pacs", ["down", "slow"])
def test_pacs_down_or_slow_is_unavailable_naming_it(server, pacs):
    """`down`: nothing listens; `slow`: it takes the connection and never answers (the PACS's
    timeout_s is 2 s)."""
    started = time.monotonic()
    with server.client() as client, pytest.raises(grpc.RpcError) as e:
        client.predict_study(pacs, generate_uid(), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"PACS '{pacs}'" in e.value.details()
    assert time.monotonic() - started < 10


def _store(orthanc, datasets) -> None:
    answer = dicomweb(orthanc).store_instances(datasets)
    assert not answer.get("FailedSOPSequence")


def test_a_refused_sr_is_reported_and_the_answers_stand(server, orthanc):
    """The PACS drops this study's SRs (a storage rule keyed on its accession number; Orthanc's
    DICOMweb still answers success): the answer says the SR was not stored, and still carries
    the predictions."""
    ds = pydicom.dcmread(server.patients[1] / "xray.dcm")
    ds.StudyInstanceUID, ds.AccessionNumber = generate_uid(), REFUSE_SR_ACCESSION
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    _store(orthanc, [ds])
    with server.client() as client:
        response = client.predict_study(
            "main", ds.StudyInstanceUID, tasks=["bone_age_classification"], store_sr=True
        )
    assert [a.prediction.task for a in response.answers] == ["bone_age_classification"]
    assert not response.sr.stored
    assert response.sr.message == (
        "PACS 'main' refused the SR: it acknowledged the store but does not list the SR"
    )
    assert not dicomweb(orthanc).search_for_series(
        ds.StudyInstanceUID, search_filters={"Modality": "SR"}
    )


def test_study_with_nothing_usable(server, orthanc):
    ds = pydicom.dcmread(server.patients[0] / "xray.dcm")
    ds.Modality, ds.StudyInstanceUID = "US", generate_uid()
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    _store(orthanc, [ds])
    with server.client() as client, pytest.raises(grpc.RpcError) as e:
        client.predict_study("main", ds.StudyInstanceUID)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "it holds US" in e.value.details()


def test_corrupt_series_fails_alone(server, orthanc):
    """A CT whose slices say Rescale Slope NaN: that series is named as unreadable, and the
    X-ray of the same study still answers disease classification."""
    patient, study = server.patients[0], generate_uid()
    instances = [pydicom.dcmread(patient / "xray.dcm")]
    instances += [pydicom.dcmread(f) for f in sorted((patient / "ct").iterdir())]
    series = {}
    for ds in instances:
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(ds.Modality, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if ds.Modality == "CT":
            ds.RescaleSlope = "NaN"
    _store(orthanc, instances)
    with server.client() as client:
        response = client.predict_study("main", study, tasks=["disease_classification"])
    (answer,) = response.answers
    assert list(answer.prediction.modalities_used) == ["xray"]
    ct = next(s for s in response.series if s.dicom_modality == "CT")
    assert not ct.modality and "RescaleSlope is not a finite number" in ct.ignored_reason


def test_pydicom_real_ct_and_mr_as_one_study(server, orthanc):
    """pydicom's bundled real CT and MR files (one slice each), made one study: each is read
    as a one-slice volume, and the tasks they support are answered; VQA, which needs a
    question, is skipped and says so."""
    study = generate_uid()
    datasets = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID, ds.PatientID = study, "REAL-1"
        datasets.append(ds)
    _store(orthanc, datasets)
    with server.client() as client:
        response = client.predict_study("main", study)
    assert sorted(s.modality for s in response.series) == ["ct", "mri"]
    answered = {a.prediction.task for a in response.answers}
    assert answered == {"disease_classification", "brain_tumor_classification"}
    (skipped,) = response.skipped
    assert (
        skipped.task == "medical_vqa"
        and skipped.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    )
    assert "requires text" in skipped.message


def test_patient_identifiers_never_logged(server, uploaded):
    """After the studies above: no patient name or id in the server's or Ray's logs."""
    logs = [server.process.args[server.process.args.index("--config") + 1]]
    work = Path(logs[0]).parent
    texts = [(work / "serve.log").read_text()]
    for session_dir in _ray_session_dirs(server.process.pid):
        texts += [
            p.read_text(errors="replace")
            for p in (session_dir / "logs").rglob("*")
            if p.is_file() and p.suffix in (".log", ".out", ".err")
        ]
    text = "\n".join(texts)
    for patient in server.patients:
        assert patient.name not in text
        assert f"Synthetic^{patient.name}" not in text
    assert "REAL-1" not in text and "CompressedSamples" not in text  # CT_small's patient


def _ray_session_dirs(pid: int) -> set[Path]:
    from servers import session_processes

    dirs = set()
    for cmd in session_processes(pid).values():
        for part in cmd.split():
            if part.startswith("--session-dir=") or part.startswith("--session_dir="):
                dirs.add(Path(part.split("=", 1)[1]))
    assert dirs, "the server's Ray session directory was not found"
    return dirs
