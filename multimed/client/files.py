"""Files as wire inputs: what a client reads from disk before sending. Kept apart from the
cohort writer so that clients import neither the generator, the format writers nor torch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from multimed.models.catalog import CATALOG, InputForm
from multimed.models.inputs import RawInput

# File suffix -> the form it holds and how its payload is read.
_SUFFIXES: dict[str, tuple[InputForm, Callable[[Path], Any]]] = {
    **dict.fromkeys((".dcm", ".dicom"), (InputForm.DICOM, Path.read_bytes)),
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".tif", ".tiff"), (InputForm.IMAGE, Path.read_bytes)),
    ".edf": (InputForm.EDF, Path.read_bytes),
    ".json": (InputForm.GENE_COUNTS, lambda path: json.loads(path.read_text())),
    ".npy": (InputForm.TENSOR, lambda path: np.load(path, allow_pickle=False)),
}
# Strings take their modality's string form: a note (TEXT) or a raw or FASTA sequence (SEQUENCE).
_STRING_FORMS = (InputForm.TEXT, InputForm.SEQUENCE)


def read_input(modality: str, path: Path) -> RawInput:
    """A file (or a directory of DICOM slices) -> a wire input, its form told by its name; a
    file of any other type is text (`string_input`)."""
    CATALOG.modality(modality)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return RawInput(modality, InputForm.DICOM_SERIES, [p.read_bytes() for p in files])
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES:
        form, read = _SUFFIXES[suffix]
        return RawInput(modality, form, read(path))
    return string_input(modality, path.read_text())


def string_input(modality: str, text: str) -> RawInput:
    """A string -> a wire input in the string form that the catalog lists for the modality. A
    modality with none gets SEQUENCE, which its pipeline then refuses by name."""
    forms = CATALOG.modality(modality).forms
    form = next((f for f in _STRING_FORMS if f in forms), InputForm.SEQUENCE)
    return RawInput(modality, form, text)
