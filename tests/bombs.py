"""Bombs, built with the real libraries, that the codec tests (tests/unit/test_limits.py), the
fuzz and the server's bomb test (tests/system) send: small on the wire, huge once decoded."""

from __future__ import annotations

import io

import edfio
import numpy as np
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from multimed.models.codecs import dicom
from multimed.models.codecs.dicom import write_dicom

XRAY = write_dicom(np.random.default_rng(0).random((32, 32)) * 1000, "DX")


def edited(data: bytes, *, syntax: str | None = None, **changes) -> bytes:
    """Re-encode a DICOM with tags changed (and, given `syntax`, another transfer syntax)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for key, value in changes.items():
        setattr(ds, key, value)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def deflate_bomb() -> bytes:
    """~100 KB that pydicom would inflate to 80 MiB of zeros (PixelData past MAX_BYTES)."""
    return edited(
        XRAY, syntax=DeflatedExplicitVRLittleEndian, PixelData=bytes(dicom.MAX_BYTES + 2**24)
    )


def edf_bytes(signals: list[edfio.EdfSignal]) -> bytes:
    buffer = io.BytesIO()
    edfio.Edf(signals).write(buffer)
    return buffer.getvalue()


def resample_bomb() -> bytes:
    """200 slow signals that would each be resampled to the one fast signal's 1 kHz: 1.2e8
    values from under 2 MB."""
    slow = [edfio.EdfSignal(np.zeros(600), 1, label=f"S{i}") for i in range(200)]
    return edf_bytes([*slow, edfio.EdfSignal(np.zeros(600_000), 1000, label="Cz")])
