"""The synthetic cohort on disk and on the wire: each modality rendered in its real format
(DICOM, PNG, EDF, FASTA, gene-count JSON, text). Reading files back is `inputs.read_input`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from multimed.models.catalog import InputForm
from multimed.models.data.dicom_io import write_dicom, write_dicom_series
from multimed.models.data.edf_io import write_edf
from multimed.models.data.image_io import write_png
from multimed.models.data.sequence_io import write_fasta
from multimed.models.data.synthetic import generate_cohort, labels_json
from multimed.models.modalities.base import RawInput
from multimed.models.modalities.registry import PIPELINES

# [0, 1] images are stored as 12-bit values whose DICOM window maps them back to [0, 1] exactly.
_DICOM_FULL_SCALE = 4095.0
_DICOM_UNIT_WINDOW = (2048.0, 4096.0)

# Each modality's file in a patient directory (a directory means a DICOM series).
FILES = {
    "text": "note.txt",
    "xray": "xray.dcm",
    "oct": "oct.png",
    "pathology": "pathology.png",
    "ct": "ct",
    "mri": "mri",
    "eeg": "eeg.edf",
    "genomics": "genomics.fasta",
    "protein": "protein.fasta",
    "scrna": "scrna.json",
}
QUESTION_FILE = "question.txt"


def to_wire(modality: str, decoded: object, record_id: str = "sample") -> RawInput:
    """A decoded object -> the RawInput a client would send for it, in the modality's usual
    clinical format."""
    if modality == "text":
        return RawInput(modality, InputForm.TEXT, decoded)
    if modality == "xray":
        image = np.asarray(decoded)[0] * _DICOM_FULL_SCALE
        data = write_dicom(image, PIPELINES["xray"].dicom_modality_code, window=_DICOM_UNIT_WINDOW)
        return RawInput(modality, InputForm.DICOM, data)
    if modality in ("oct", "pathology"):
        return RawInput(modality, InputForm.IMAGE, write_png(np.asarray(decoded)))
    if modality in ("ct", "mri"):
        code = PIPELINES[modality].dicom_modality_code
        return RawInput(modality, InputForm.DICOM_SERIES, write_dicom_series(decoded, code))
    if modality == "eeg":
        return RawInput(modality, InputForm.EDF, write_edf(decoded))
    if modality in ("genomics", "protein"):
        return RawInput(modality, InputForm.SEQUENCE, write_fasta(record_id, decoded))
    if modality == "scrna":
        genes = PIPELINES["scrna"].Settings().genes
        counts = {g: float(c) for g, c in zip(genes, decoded.counts, strict=True) if c}
        return RawInput(modality, InputForm.GENE_COUNTS, counts)
    raise KeyError(modality)


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
    """Write n patients as one directory each, plus labels.json (label names per task)."""
    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for patient in generate_cohort(n, seed):
        folder = out / patient.id
        folder.mkdir(exist_ok=True)
        for m, decoded in patient.inputs.items():
            _write(folder / FILES[m], to_wire(m, decoded, patient.id))
        (folder / QUESTION_FILE).write_text(patient.question)
        labels[patient.id] = {"vqa_modality": patient.vqa_modality, **labels_json(patient)}
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    return n
