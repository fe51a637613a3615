"""The DICOM SR writer: what a PACS user reads back from the stored document."""

from __future__ import annotations

import dataclasses
from io import BytesIO

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from multimed.models.catalog import CATALOG, CELL_TYPES
from multimed.models.codecs.dicom import write_dicom
from multimed.models.trust import OodScore
from multimed.services.frontends.hospital import codes
from multimed.services.frontends.hospital.findings import StudyFindings, TaskFinding
from multimed.services.frontends.hospital.sr import (
    NONE_OVER_THRESHOLD,
    OUT_OF_DISTRIBUTION,
    build_sr,
)

VERSION = "bundle-2024.06.1"
PATIENT_ID, PATIENT_NAME = "PAT-0042", "Doe^Jane"
LONG_LABEL = CELL_TYPES[4]  # "CD4+/CD45RA+/CD25- Naive T": over 16 characters, with spaces


def _instance(study_uid: str, modality: str) -> pydicom.Dataset:
    image = np.random.default_rng(0).uniform(0, 100, (8, 8))
    ds = pydicom.dcmread(BytesIO(write_dicom(image, modality)))
    ds.PatientID, ds.PatientName, ds.StudyInstanceUID = PATIENT_ID, PATIENT_NAME, study_uid
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240601", "101500", "ACC1"
    return ds


def _finding(task: str, predicted: tuple[str, ...], series: tuple[str, ...] = ()) -> TaskFinding:
    spec = CATALOG.task(task)
    scores = tuple(1.0 if label in predicted else 0.0 for label in spec.labels)
    return TaskFinding(task, spec.output, spec.labels, scores, predicted, ("xray",), series)


def _findings(study_uid: str, *findings: TaskFinding) -> StudyFindings:
    return StudyFindings(
        study_uid=study_uid,
        patient_id=PATIENT_ID,
        accession_number="ACC1",
        bundle_version=VERSION,
        wado_url="http://pacs.example/dicom-web",
        findings=findings,
        series=(),
    )


@pytest.fixture
def evidence() -> list[pydicom.Dataset]:
    study_uid = generate_uid()
    return [_instance(study_uid, "DX"), _instance(study_uid, "CT")]


def _stored(sr: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    """Through the bytes STOW-RS would send, and back as a reader gets it."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    assert buffer.getvalue()[128:132] == b"DICM"  # Part 10 file, with its file meta
    return hd.sr.srread(BytesIO(buffer.getvalue()))


def _evaluations(sr: hd.sr.Comprehensive3DSR) -> dict[str, list[hd.sr.CodedConcept]]:
    """task id -> coded values of its qualitative evaluations, all groups together."""
    out: dict[str, list[hd.sr.CodedConcept]] = {}
    for group in sr.content.get_image_measurement_groups():
        for evaluation in group.get_qualitative_evaluations():
            assert evaluation.name.scheme_designator == codes.DICOM_SCHEME
            out.setdefault(evaluation.name.value, []).append(evaluation.value)
    return out


def _text(group, concept) -> list[str]:
    return [item.value for item in find_content_items(group[0], name=concept)]


@pytest.fixture
def mixed(evidence) -> tuple[StudyFindings, hd.sr.Comprehensive3DSR]:
    study_uid = evidence[0].StudyInstanceUID
    findings = _findings(
        study_uid,
        _finding("disease_classification", ("infection",), (evidence[0].SeriesInstanceUID,)),
        _finding("radiographic_findings_classification", ("cardiomegaly", "effusion")),
        _finding("medical_vqa", ("yes",)),
        _finding("expression_prediction", ()),
        _finding("cell_type_classification", (LONG_LABEL,)),
    )
    return findings, _stored(build_sr(findings, evidence))


def test_one_coded_evaluation_per_task_and_per_predicted_label(mixed):
    _, sr = mixed
    found = _evaluations(sr)
    assert {task: [(c.value, c.scheme_designator) for c in v] for task, v in found.items()} == {
        "disease_classification": [("infection", codes.DICOM_SCHEME)],
        "radiographic_findings_classification": [
            ("cardiomegaly", codes.DICOM_SCHEME),
            ("effusion", codes.DICOM_SCHEME),
        ],
        "medical_vqa": [("yes", codes.DICOM_SCHEME)],
        "cell_type_classification": [(LONG_LABEL, codes.DICOM_SCHEME)],
    }
    # The regression task has no label to code: it goes to FHIR, not into the SR.
    assert "expression_prediction" not in found
    ids = [g.tracking_identifier for g in sr.content.get_image_measurement_groups()]
    assert "expression_prediction" not in ids


def test_long_codes_are_long_code_values(mixed):
    _, sr = mixed
    names = [
        item.ConceptNameCodeSequence[0]
        for group in sr.content.get_image_measurement_groups()
        for item in find_content_items(group[0], value_type=hd.sr.ValueTypeValues.CODE)
    ]
    long_task = next(n for n in names if "LongCodeValue" in n)
    assert long_task.LongCodeValue in {
        "disease_classification",
        "radiographic_findings_classification",
        "cell_type_classification",
    }
    assert "CodeValue" not in long_task
    values = [
        item.ConceptCodeSequence[0]
        for group in sr.content.get_image_measurement_groups()
        for item in find_content_items(group[0], value_type=hd.sr.ValueTypeValues.CODE)
        if "ConceptCodeSequence" in item
    ]
    long_value = next(v for v in values if v.get("LongCodeValue") == LONG_LABEL)
    assert "CodeValue" not in long_value
    short_value = next(v for v in values if v.get("CodeValue") == "infection")
    assert short_value.CodeMeaning == "infection"
    # The task's name carries the catalog's description as its meaning.
    disease = next(n for n in names if n.get("LongCodeValue") == "disease_classification")
    assert disease.CodeMeaning == CATALOG.task("disease_classification").description


def test_algorithm_name_and_version_in_every_group(mixed):
    _, sr = mixed
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 4
    for group in groups:
        assert _text(group, dcm_codes.DCM.AlgorithmName) == [codes.ALGORITHM_NAME]
        assert _text(group, dcm_codes.DCM.AlgorithmVersion) == [VERSION]


def test_device_observer_is_the_algorithm(mixed):
    _, sr = mixed
    [observer] = sr.content.get_observer_contexts(observer_type=dcm_codes.cid270.Device)
    attributes = observer.observer_identifying_attributes
    assert attributes.uid == codes.device_uid(VERSION)
    assert attributes.name == codes.ALGORITHM_NAME


def _air_equipment(sr: pydicom.Dataset) -> pydicom.Dataset:
    """The Contributing Equipment item IHE AIR asks for: purpose "Processing Algorithm"."""
    [item] = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    return item


def test_contributing_equipment_follows_ihe_air(mixed, evidence):
    findings, sr = mixed
    item = _air_equipment(sr)
    [purpose] = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "99IHE",
        "Processing Algorithm",
    )
    assert item.Manufacturer == codes.MANUFACTURER
    assert item.ManufacturerModelName == codes.ALGORITHM_NAME
    assert item.SoftwareVersions == VERSION
    assert item.DeviceUID == codes.device_uid(VERSION)
    # A new model is a new device.
    newer = build_sr(dataclasses.replace(findings, bundle_version="bundle-2025.01.0"), evidence)
    assert _air_equipment(newer).DeviceUID == codes.device_uid("bundle-2025.01.0")
    assert _air_equipment(newer).DeviceUID != item.DeviceUID


def test_header_marks_unverified_ai_output_in_the_same_study(mixed, evidence):
    findings, sr = mixed
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert "AI" in sr.SeriesDescription
    assert sr.Manufacturer == codes.MANUFACTURER
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.StudyInstanceUID == findings.study_uid == evidence[0].StudyInstanceUID
    assert sr.PatientID == PATIENT_ID
    assert str(sr.PatientName) == PATIENT_NAME
    assert sr.AccessionNumber == "ACC1"
    assert sr.SeriesNumber == 9900 and sr.InstanceNumber == 1
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in evidence}
    assert sr.SOPInstanceUID not in {ds.SOPInstanceUID for ds in evidence}


def test_new_uids_and_given_numbers_each_time(evidence):
    findings = _findings(evidence[0].StudyInstanceUID, _finding("medical_vqa", ("no",)))
    first = build_sr(findings, evidence, series_number=42, instance_number=7)
    second = build_sr(findings, evidence)
    assert (first.SeriesNumber, first.InstanceNumber) == (42, 7)
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID


def test_evidence_is_listed(mixed, evidence):
    _, sr = mixed
    listed = {
        (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert listed == {(ds.SOPClassUID, ds.SOPInstanceUID) for ds in evidence}
    assert "PertinentOtherEvidenceSequence" not in sr


def test_multi_label_with_nothing_over_threshold_says_so(evidence):
    findings = _findings(
        evidence[0].StudyInstanceUID, _finding("radiographic_findings_classification", ())
    )
    found = _evaluations(_stored(build_sr(findings, evidence)))
    [value] = found["radiographic_findings_classification"]
    assert (value.value, value.scheme_designator) == (NONE_OVER_THRESHOLD, codes.DICOM_SCHEME)
    assert NONE_OVER_THRESHOLD not in CATALOG.task("radiographic_findings_classification").labels


def test_only_uncodable_tasks_still_make_a_valid_sr(evidence):
    findings = _findings(
        evidence[0].StudyInstanceUID,
        _finding("expression_prediction", ()),
        _finding("protein_structure_prediction", ()),
    )
    sr = _stored(build_sr(findings, evidence))
    assert _evaluations(sr) == {}
    [group] = sr.content.get_image_measurement_groups()
    assert _text(group, dcm_codes.DCM.AlgorithmVersion) == [VERSION]


def test_minimal_evidence_headers_are_filled_without_touching_the_input(evidence):
    # write_dicom's instances lack Type 2 attributes highdicom copies (Patient's Birth Date...).
    assert "PatientBirthDate" not in evidence[0]
    findings = _findings(evidence[0].StudyInstanceUID, _finding("medical_vqa", ("no",)))
    sr = _stored(build_sr(findings, evidence))
    assert sr.PatientBirthDate == "" and sr.PatientID == PATIENT_ID
    assert "PatientBirthDate" not in evidence[0]


def test_refuses_evidence_of_another_study_or_patient(evidence):
    findings = _findings(evidence[0].StudyInstanceUID, _finding("medical_vqa", ("no",)))
    with pytest.raises(ValueError, match="at least one"):
        build_sr(findings, [])
    stranger = _instance(generate_uid(), "DX")
    with pytest.raises(ValueError, match="study"):
        build_sr(findings, [*evidence, stranger])
    evidence[1].PatientID = "SOMEONE-ELSE"
    with pytest.raises(ValueError, match="patient") as raised:
        build_sr(findings, evidence)
    assert "SOMEONE-ELSE" not in str(raised.value) and PATIENT_ID not in str(raised.value)


def test_a_flagged_input_is_an_evaluation_naming_its_modality(evidence):
    finding = dataclasses.replace(
        _finding("disease_classification", ("infection",)),
        modalities=("xray", "text"),
        out_of_distribution={"xray": OodScore(9.4, 2.7, True), "text": OodScore(0.8, 1.1, False)},
    )
    found = _evaluations(
        _stored(build_sr(_findings(evidence[0].StudyInstanceUID, finding), evidence))
    )
    assert [v.value for v in found[OUT_OF_DISTRIBUTION]] == ["xray"]
    assert [v.value for v in found["disease_classification"]] == ["infection"]
