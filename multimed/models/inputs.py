"""The wire input type, kept free of torch so that clients can build and read inputs cheaply."""

from __future__ import annotations

from collections.abc import Mapping
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

    @property
    def size(self) -> int:
        """About how many bytes the input holds (a gene map: 16 per entry): what decides
        whether decoding or hashing it is worth a thread hop."""
        data = self.data
        if isinstance(data, str | bytes | bytearray):
            return len(data)
        if hasattr(data, "nbytes"):  # numpy (without importing it here), memoryview
            return int(data.nbytes)
        if isinstance(data, Mapping):
            return 16 * len(data)
        if isinstance(data, list | tuple):  # a DICOM series
            return sum(len(part) for part in data if isinstance(part, bytes | bytearray))
        return 0  # nothing a front door builds; decoding names the problem
