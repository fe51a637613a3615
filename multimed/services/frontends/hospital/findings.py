"""What one study's answer holds, protocol-free: the input of the SR and FHIR writers and of the
wire conversion. Patient identifiers live here for the writers only; nothing logs them."""

from __future__ import annotations

from dataclasses import dataclass, field

from multimed.models.catalog import OutputKind
from multimed.models.trust import OodScore


@dataclass(frozen=True)
class SeriesRef:
    """One series of the study, as QIDO-RS lists it."""

    uid: str
    modality_code: str  # DICOM Modality: DX, CT, MR, OPT, SM, SR, ...
    number: int | None  # Series Number
    description: str  # Series Description, may be empty
    instances: int  # Number of Series Related Instances
    body_part: str = ""  # Body Part Examined, may be empty


@dataclass(frozen=True)
class TaskFinding:
    """One task's answer for the study."""

    task: str  # catalog task id
    kind: OutputKind
    labels: tuple[str, ...]  # the task's labels, catalog order
    scores: tuple[float, ...]  # per label (REGRESSION: the predicted values); empty for PER_TOKEN
    predicted: tuple[str, ...]  # top label (single-label, answer), those over 0.5 (multi-label)
    modalities: tuple[str, ...]  # modalities the answer used
    series_uids: tuple[str, ...]  # the study's series it used (extra inputs have none)
    out_of_distribution: dict[str, OodScore] = field(default_factory=dict)  # per used modality

    @property
    def untrusted(self) -> tuple[str, ...]:
        """Modalities whose input is flagged out of distribution."""
        return tuple(m for m, o in self.out_of_distribution.items() if o.flagged)


@dataclass(frozen=True)
class StudyFindings:
    """A study's identity (from its DICOM headers), the model that answered, and the answers."""

    study_uid: str
    patient_id: str  # DICOM Patient ID: FHIR references the patient by it, as an identifier
    accession_number: str  # may be empty
    bundle_version: str  # the model bundle's version: the algorithm's version
    wado_url: str  # the PACS's DICOMweb base URL (ImagingStudy's WADO-RS endpoint)
    findings: tuple[TaskFinding, ...]
    series: tuple[SeriesRef, ...]  # every series of the study, as listed by QIDO-RS
