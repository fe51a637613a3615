"""Files as wire inputs: what a client reads from disk before sending. Kept apart from the
cohort writer so that clients do not import the generator and the format writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from multimed.models.catalog import CATALOG, InputForm
from multimed.models.modalities.base import RawInput


def read_input(modality: str, path: Path) -> RawInput:
    """A file (or a directory of DICOM slices) -> a wire input, its form told by its name."""
    CATALOG.modality(modality)
    suffix = path.suffix.lower()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return RawInput(modality, InputForm.DICOM_SERIES, [p.read_bytes() for p in files])
    if suffix in (".dcm", ".dicom"):
        return RawInput(modality, InputForm.DICOM, path.read_bytes())
    if suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        return RawInput(modality, InputForm.IMAGE, path.read_bytes())
    if suffix == ".edf":
        return RawInput(modality, InputForm.EDF, path.read_bytes())
    if suffix == ".json":
        return RawInput(modality, InputForm.GENE_COUNTS, json.loads(path.read_text()))
    if suffix == ".npy":
        return RawInput(modality, InputForm.TENSOR, np.load(path, allow_pickle=False))
    if modality == "text":
        return RawInput(modality, InputForm.TEXT, path.read_text())
    return RawInput(modality, InputForm.SEQUENCE, path.read_text())
