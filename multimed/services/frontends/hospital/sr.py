"""A study's coded answers as a DICOM SR the PACS stores next to the images (IHE AI Results).

The document is a Comprehensive 3D SR whose content is a TID 1500 Measurement Report, written
with highdicom: one TID 1501 measurement group per task, each naming the algorithm (TID 4019) and
holding the task's predicted label(s) as coded qualitative evaluations. Nothing here logs: the
document carries patient data copied from the evidence.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from multimed.models.catalog import CATALOG, OutputKind
from multimed.services.frontends.hospital import codes
from multimed.services.frontends.hospital.findings import StudyFindings, TaskFinding

SERIES_DESCRIPTION = f"AI results ({codes.ALGORITHM_NAME}), not verified"

# IHE RAD Suppl. AI Results (AIR) Rev 1.1, 6.5.3.1 "General Result Encoding Requirements": the
# Creator describes each algorithm in the Contributing Equipment Sequence with Manufacturer,
# Manufacturer's Model Name, Software Versions, Device UID and Purpose of Reference
# (Newcode1, 99IHE, "Processing Algorithm") - quoted as such by MONAI Deploy App SDK's SR writer
# (ModelInfo). DICOM has no standard code for it yet (pydicom 3.0's code dictionary has none), so
# the IHE interim code is used as the profile states, not DCM 109102 "Processing Equipment".
AIR_PROCESSING_ALGORITHM = hd.sr.CodedConcept(
    value="Newcode1", scheme_designator="99IHE", meaning="Processing Algorithm"
)
# A multi-label task with no label over the threshold still gets an evaluation, so that a reader
# tells "ran, found none" from "did not run". Not a catalog label (no label has this name).
NONE_OVER_THRESHOLD = "none_over_threshold"
OUT_OF_DISTRIBUTION = "out_of_distribution"  # its value: the modality whose input is flagged
UNTRUSTED = "Input out of distribution: do not rely on this result"

# Kinds with a label to code; REGRESSION values and PER_TOKEN labels go to FHIR instead.
_CODED_KINDS = frozenset({OutputKind.SINGLE_LABEL, OutputKind.MULTI_LABEL, OutputKind.ANSWER})
# Type 2 Patient/Study attributes highdicom reads from the first evidence instance; a PACS copy
# may lack them (our synthetic Secondary Captures do), and empty is DICOM's "unknown".
_TYPE2_HEADER = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def build_sr(
    findings: StudyFindings,
    evidence: Sequence[pydicom.Dataset],
    *,
    series_number: int = 9900,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """The study's answers as an unverified TID 1500 SR in a new series of the same study.

    Single-label and answer tasks give one coded qualitative evaluation (name: the task, value:
    the predicted label, both in codes.DICOM_SCHEME); multi-label tasks one per predicted label,
    or one NONE_OVER_THRESHOLD when none is. REGRESSION and PER_TOKEN tasks have no label to code
    and are left out (they go to FHIR); if no task is left, the report holds one group naming the
    algorithm and no evaluation, which is still a valid SR.

    evidence: the study's instances the answers used, as read from the PACS; patient and study
    attributes are copied from the first and all are listed as evidence. Raises ValueError if
    there is none, or if any is of another study or patient than `findings`.
    """
    _check_evidence(findings, evidence)
    version = findings.bundle_version
    algorithm = hd.sr.AlgorithmIdentification(
        name=codes.ALGORITHM_NAME, version=version, manufacturer=codes.MANUFACTURER
    )
    groups = [_group(f, algorithm) for f in findings.findings if f.kind in _CODED_KINDS]
    if not groups:
        # highdicom needs one measurement group at least (TID 1500 row 6 holds 1-n).
        groups = [_group(None, algorithm)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=dcm_codes.cid270.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=codes.device_uid(version),
                    name=codes.ALGORITHM_NAME,
                    manufacturer_name=codes.MANUFACTURER,
                    model_name=codes.ALGORITHM_NAME,
                ),
            )
        ),
        # AIR: the procedure analysed, not the algorithm; the study's own code when it has one.
        procedure_reported=_procedure(evidence[0]),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[_with_type2_header(evidence[0]), *evidence[1:]],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=codes.MANUFACTURER,
        manufacturer_model_name=codes.ALGORITHM_NAME,
        software_versions=version,
        series_description=SERIES_DESCRIPTION,
        # Nothing is added to this document later; the numeric answers go to FHIR by design.
        is_complete=True,
        is_final=False,
        is_verified=False,  # VerificationFlag UNVERIFIED: no accountable person has read it
        # Explicit VR: Orthanc (STOW-RS) and readers get the VRs of the long code values.
        transfer_syntax_uid=ExplicitVRLittleEndian,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=codes.DICOM_SCHEME,
                name=codes.DICOM_SCHEME_NAME,
                responsible_organization=codes.MANUFACTURER,
            ),
        ],
        # highdicom appends its own item (the library, "Processing Equipment") after ours.
        contributing_equipment=[_air_equipment(version)],
    )


def _check_evidence(findings: StudyFindings, evidence: Sequence[pydicom.Dataset]) -> None:
    # The messages name no UID nor ID: they may end up in logs.
    if not evidence:
        raise ValueError("an SR needs at least one evidence instance of the study")
    for ds in evidence:
        if ds.get("StudyInstanceUID") != findings.study_uid:
            raise ValueError("an evidence instance is not of the findings' study")
        if ds.get("PatientID", "") != findings.patient_id:
            raise ValueError("an evidence instance is not of the findings' patient")


def _with_type2_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    missing = [kw for kw in _TYPE2_HEADER if kw not in ds]
    if not missing:
        return ds
    # A new dataset of the same elements: the caller's stays as it was, pixels are not copied.
    filled = pydicom.Dataset()
    for element in ds:
        filled.add(element)
    for kw in missing:
        setattr(filled, kw, "")
    return filled


def _procedure(ds: pydicom.Dataset) -> hd.sr.CodedConcept | Code:
    procedure = ds.get("ProcedureCodeSequence")
    if procedure:
        return hd.sr.CodedConcept.from_dataset(procedure[0])
    return dcm_codes.SCT.ImagingProcedure


def _group(
    finding: TaskFinding | None, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    # TID 4019 Algorithm Identification sits in each TID 1501 group (highdicom's `algorithm_id`),
    # the place TID 1501 gives it; the document has no other TID 4019 slot.
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(),
            identifier=finding.task if finding else codes.ALGORITHM_NAME,
        ),
        algorithm_id=algorithm,
        qualitative_evaluations=_evaluations(finding) if finding else None,
    )


def _evaluations(finding: TaskFinding) -> list[hd.sr.QualitativeEvaluation]:
    spec = CATALOG.tasks.get(finding.task)
    name = _concept(finding.task, spec.description if spec else finding.task)
    # Multi-label: every label over the threshold is a finding of its own, so each gets an
    # evaluation of the same name; an explicit code when none is over it (see the constant).
    labels = finding.predicted
    # An input the models never saw the like of (models/trust.py): said per modality, so that
    # a reader weighs the answer by it.
    untrusted = [
        hd.sr.QualitativeEvaluation(
            name=_concept(OUT_OF_DISTRIBUTION, UNTRUSTED), value=_concept(m, m)
        )
        for m in finding.untrusted
    ]
    if finding.kind == OutputKind.MULTI_LABEL and not labels:
        none = _concept(NONE_OVER_THRESHOLD, "No label over the decision threshold")
        return [hd.sr.QualitativeEvaluation(name=name, value=none), *untrusted]
    return [
        hd.sr.QualitativeEvaluation(name=name, value=_concept(x, x)) for x in labels
    ] + untrusted


def _concept(value: str, meaning: str) -> hd.sr.CodedConcept:
    # highdicom writes a value over 16 characters as Long Code Value (0008,0119), as DICOM
    # requires for our long task ids and labels; Code Meaning is an LO, 64 characters at most.
    return hd.sr.CodedConcept(
        value=value, scheme_designator=codes.DICOM_SCHEME, meaning=meaning[:64]
    )


def _air_equipment(version: str) -> hd.ContributingEquipment:
    equipment = hd.ContributingEquipment(
        manufacturer=codes.MANUFACTURER,
        # highdicom accepts CID 7005 codes only; replaced by the AIR code just below.
        purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=codes.ALGORITHM_NAME,
        software_versions=version,
        contribution_description="AI model that produced the results",
    )
    equipment.PurposeOfReferenceCodeSequence = [AIR_PROCESSING_ALGORITHM]
    # Derived from the bundle version: a new model gets a new Device UID, as AIR asks.
    equipment.DeviceUID = codes.device_uid(version)
    return equipment
