"""The synthetic cohort on disk and on the wire: each modality rendered in its real format
(DICOM, PNG, EDF, FASTA, gene-count JSON, text). Reading files back is
`multimed.client.files.read_input`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from multimed.models.catalog import CATALOG, InputForm
from multimed.models.codecs.dicom import NEW_SERIES, SeriesInfo, write_dicom, write_dicom_series
from multimed.models.codecs.edf import write_edf
from multimed.models.codecs.image import write_png
from multimed.models.codecs.sequence import write_fasta
from multimed.models.codecs.types import EEGRecord, GeneCounts
from multimed.models.cohort.synthetic import generate_cohort, labels_json
from multimed.models.inputs import RawInput
from multimed.models.modalities.registry import PIPELINES

# [0, 1] images are stored as 12-bit values whose DICOM window maps them back to [0, 1] exactly.
_DICOM_FULL_SCALE = 4095.0
_DICOM_UNIT_WINDOW = (2048.0, 4096.0)

# --- renderers: (modality, decoded object, record id, DICOM series) -> the RawInput a client
# would send; the DICOM ones write into the given patient, study and series ---


def _text(modality: str, decoded: str, record_id: str, series: SeriesInfo) -> RawInput:
    return RawInput(modality, InputForm.TEXT, decoded)


def _dicom_image(
    modality: str, decoded: np.ndarray, record_id: str, series: SeriesInfo
) -> RawInput:
    code = PIPELINES[modality].dicom_modality_code
    decoded = np.asarray(decoded)
    if decoded.shape[0] == 3:  # RGB, stored as 8-bit values
        data = write_dicom(decoded.transpose(1, 2, 0) * 255.0, code, series=series)
    else:
        image = decoded[0] * _DICOM_FULL_SCALE
        data = write_dicom(image, code, window=_DICOM_UNIT_WINDOW, series=series)
    return RawInput(modality, InputForm.DICOM, data)


def _png(modality: str, decoded: np.ndarray, record_id: str, series: SeriesInfo) -> RawInput:
    return RawInput(modality, InputForm.IMAGE, write_png(np.asarray(decoded)))


def _dicom_series(
    modality: str, decoded: np.ndarray, record_id: str, series: SeriesInfo
) -> RawInput:
    code = PIPELINES[modality].dicom_modality_code
    return RawInput(
        modality, InputForm.DICOM_SERIES, write_dicom_series(decoded, code, series=series)
    )


def _edf(modality: str, decoded: EEGRecord, record_id: str, series: SeriesInfo) -> RawInput:
    return RawInput(modality, InputForm.EDF, write_edf(decoded))


def _fasta(modality: str, decoded: str, record_id: str, series: SeriesInfo) -> RawInput:
    return RawInput(modality, InputForm.SEQUENCE, write_fasta(record_id, decoded))


def _gene_counts(
    modality: str, decoded: GeneCounts, record_id: str, series: SeriesInfo
) -> RawInput:
    genes = PIPELINES[modality].Settings().genes
    counts = {g: float(c) for g, c in zip(genes, decoded.counts, strict=True) if c}
    return RawInput(modality, InputForm.GENE_COUNTS, counts)


@dataclass(frozen=True)
class WireFormat:
    file: str  # its name in a patient directory (a directory holds a DICOM series)
    render: Callable[[str, object, str, SeriesInfo], RawInput]


# Each modality's usual clinical format; a new modality adds its line here.
WIRE_FORMATS = {
    "text": WireFormat("note.txt", _text),
    "xray": WireFormat("xray.dcm", _dicom_image),
    "oct": WireFormat("oct.png", _png),
    "pathology": WireFormat("pathology.png", _png),
    "ct": WireFormat("ct", _dicom_series),
    "mri": WireFormat("mri", _dicom_series),
    "eeg": WireFormat("eeg.edf", _edf),
    "genomics": WireFormat("genomics.fasta", _fasta),
    "protein": WireFormat("protein.fasta", _fasta),
    "scrna": WireFormat("scrna.json", _gene_counts),
}
FILES = {m: w.file for m, w in WIRE_FORMATS.items()}
QUESTION_FILE = "question.txt"
# Imaging whose usual format is not DICOM is also written as DICOM, so that a patient's folder
# holds one whole DICOM study for a PACS (`multimed pacs upload`).
STUDY_FORMATS = {
    **{m: w for m, w in WIRE_FORMATS.items() if w.render in (_dicom_image, _dicom_series)},
    "oct": WireFormat("oct.dcm", _dicom_image),
    "pathology": WireFormat("pathology.dcm", _dicom_image),
}
STUDY_DATE = "20260101"


def to_wire(
    modality: str, decoded: object, record_id: str = "sample", series: SeriesInfo = NEW_SERIES
) -> RawInput:
    """A decoded object -> the RawInput a client would send for it, in the modality's usual
    clinical format."""
    return WIRE_FORMATS[modality].render(modality, decoded, record_id, series)


def study_series(patient_id: str, seed: int) -> dict[str, SeriesInfo]:
    """Per imaging modality, its series in the patient's one study: UIDs derived from the
    cohort's seed and the patient, so a cohort written twice is the same study twice."""
    study_uid = generate_uid(entropy_srcs=["multimed-cohort", str(seed), patient_id])
    return {
        m: SeriesInfo(
            patient_id=patient_id,
            patient_name=f"Synthetic^{patient_id}",
            study_uid=study_uid,
            study_date=STUDY_DATE,
            accession_number=f"A{patient_id[1:]}",
            series_uid=generate_uid(entropy_srcs=[study_uid, m]),
            series_number=number,
            series_description=CATALOG.modality(m).description,
        )
        for number, m in enumerate(STUDY_FORMATS, start=1)
    }


def _write(path: Path, raw: RawInput) -> None:
    if raw.form == InputForm.DICOM_SERIES:
        path.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(raw.data):
            (path / f"{i + 1:04d}.dcm").write_bytes(data)
    elif raw.form == InputForm.GENE_COUNTS:
        path.write_text(json.dumps(raw.data, indent=0))
    elif isinstance(raw.data, str):
        path.write_text(raw.data)
    else:
        path.write_bytes(raw.data)


def write_cohort(out: Path, n: int, seed: int = 0) -> int:
    """Write n patients as one directory each, plus labels.json (label names per task). A
    patient's DICOM files make one study (`study_series`)."""
    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for patient in generate_cohort(n, seed):
        folder = out / patient.id
        folder.mkdir(exist_ok=True)
        series = study_series(patient.id, seed)
        for m, decoded in patient.inputs.items():
            _write(folder / FILES[m], to_wire(m, decoded, patient.id, series.get(m, NEW_SERIES)))
            if m in STUDY_FORMATS and STUDY_FORMATS[m].file != FILES[m]:
                raw = STUDY_FORMATS[m].render(m, decoded, patient.id, series[m])
                _write(folder / STUDY_FORMATS[m].file, raw)
        (folder / QUESTION_FILE).write_text(patient.question)
        labels[patient.id] = {"vqa_modality": patient.vqa_modality, **labels_json(patient)}
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    return n
