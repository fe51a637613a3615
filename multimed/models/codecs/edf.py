"""EDF / EDF+ bytes <-> `EEGRecord`, via edfio.

Signals recorded at different rates are resampled to the highest rate among them, so no channel
loses bandwidth and the record stays one [channels, samples] array. EDF+ annotation signals are
skipped. Values are physical, converted to microvolts from the header's physical dimension.
"""

from __future__ import annotations

import io
from fractions import Fraction

import edfio
import numpy as np
from scipy.signal import resample_poly  # scipy comes with scikit-learn, a declared dependency

from multimed.models.codecs.types import EEGRecord
from multimed.models.errors import InputError

# Physical dimension (lower case, micro sign folded to "u") -> factor to microvolts. Unlabelled
# signals are taken to be microvolts already, the EEG convention.
_TO_MICROVOLTS = {"": 1.0, "uv": 1.0, "nv": 1e-3, "mv": 1e3, "v": 1e6}


def resample(data: np.ndarray, from_hz: float, to_hz: float) -> np.ndarray:
    """Polyphase resampling along the last axis (anti-aliased when downsampling)."""
    if from_hz == to_hz:
        return data
    ratio = (Fraction(to_hz) / Fraction(from_hz)).limit_denominator(1000)
    out = resample_poly(data, ratio.numerator, ratio.denominator, axis=-1)
    return out.astype(np.float32, copy=False)


def _microvolts(signal: edfio.EdfSignal) -> np.ndarray:
    unit = signal.physical_dimension.strip().lower().replace("µ", "u").replace("μ", "u")
    return signal.data.astype(np.float32) * np.float32(_TO_MICROVOLTS.get(unit, 1.0))


def read_edf(data: bytes, modality: str = "eeg") -> EEGRecord:
    """EDF or EDF+ bytes -> EEGRecord; corrupt, truncated or non-EDF bytes -> InputError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InputError(modality, f"EDF input must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        edf = edfio.read_edf(data, lazy_load_data=False)
        declared = int(data[236:244].decode("ascii"))
        signals = [(s.label.strip(), s.sampling_frequency, _microvolts(s)) for s in edf.signals]
    # edfio reports malformed headers with assorted exception types (ValueError, IndexError,
    # ZeroDivisionError, ...); for untrusted bytes every one of them means "not a valid EDF".
    except Exception as e:
        raise InputError(modality, f"not a valid EDF file ({type(e).__name__}: {e})") from None
    # edfio only warns on a short file and trims to the complete records; -1 means "unknown".
    if declared not in (-1, edf.num_data_records):
        raise InputError(
            modality,
            f"EDF file is truncated: header declares {declared} data records, "
            f"file holds {edf.num_data_records}",
        )
    if not signals or edf.num_data_records == 0:
        raise InputError(modality, "EDF file contains no signal data")
    rate = max(hz for _, hz, _ in signals)
    rows = [resample(values, hz, rate) for _, hz, values in signals]
    samples = min(len(r) for r in rows)  # resampled lengths can differ by a rounding sample
    return EEGRecord(
        data=np.stack([r[:samples] for r in rows]).astype(np.float32),
        channels=tuple(label for label, _, _ in signals),
        sample_rate_hz=float(rate),
    )


def write_edf(record: EEGRecord) -> bytes:
    """EEGRecord (microvolts) -> plain EDF bytes.

    Data records last 1 s when the recording is a whole number of seconds; otherwise one record
    spans it all (its duration must then fit EDF's 8-character field, else ValueError).
    """
    rate = record.sample_rate_hz
    duration = record.data.shape[1] / rate
    signals = [
        edfio.EdfSignal(row.astype(np.float64), rate, label=name, physical_dimension="uV")
        for name, row in zip(record.channels, record.data, strict=True)
    ]
    edf = edfio.Edf(signals, data_record_duration=None if duration.is_integer() else duration)
    buffer = io.BytesIO()
    edf.write(buffer)
    return buffer.getvalue()
