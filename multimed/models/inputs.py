"""The wire input type, kept free of torch so that clients can build and read inputs cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multimed.models.catalog import InputForm


@dataclass(frozen=True)
class RawInput:
    """One modality's input as it arrived on the wire, already told apart by form.

    data by form: TEXT/SEQUENCE -> str; IMAGE/DICOM/EDF -> bytes; DICOM_SERIES -> list[bytes];
    GENE_COUNTS -> Mapping[str, float]; TENSOR -> np.ndarray.
    """

    modality: str
    form: InputForm
    data: Any
