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

# Limits, checked from the header before any sample is read or resampled.
MAX_SIGNALS = 256  # high-density EEG caps have up to 256 electrodes; the encoder reads 22
MAX_RATE_HZ = 16384.0  # research amplifiers sample at up to 16 kHz; clinical EEG at 128-2048 Hz
# Every signal is resampled to the highest rate: 2**24 values (64 MiB as float32) is 10 minutes,
# the pipeline's default duration limit, of 27 channels at 1 kHz.
MAX_VALUES = 2**24
MAX_DURATION_S = 3600.0  # when the caller gives none; the EEG pipeline passes its own limit
# Polyphase resampling designs a filter of 20 * max(up, down) taps: bounding both factors keeps
# it small. Rates further apart than this are refused.
MAX_RESAMPLE_FACTOR = 1000


def resample(data: np.ndarray, from_hz: float, to_hz: float) -> np.ndarray:
    """Polyphase resampling along the last axis (anti-aliased when downsampling). The rates
    must lie within MAX_RESAMPLE_FACTOR of each other (else ValueError)."""
    if from_hz == to_hz:
        return data
    ratio = Fraction(to_hz) / Fraction(from_hz)
    if not Fraction(1, MAX_RESAMPLE_FACTOR) <= ratio <= MAX_RESAMPLE_FACTOR:
        raise ValueError(f"cannot resample {from_hz:g} Hz to {to_hz:g} Hz")
    # The nearest fraction with both terms at most MAX_RESAMPLE_FACTOR.
    if ratio > 1:
        ratio = 1 / (1 / ratio).limit_denominator(MAX_RESAMPLE_FACTOR)
    else:
        ratio = ratio.limit_denominator(MAX_RESAMPLE_FACTOR)
    out = resample_poly(data, ratio.numerator, ratio.denominator, axis=-1)
    return out.astype(np.float32, copy=False)


def _microvolts(signal: edfio.EdfSignal) -> np.ndarray:
    unit = signal.physical_dimension.strip().lower().replace("µ", "u").replace("μ", "u")
    return signal.data.astype(np.float32) * np.float32(_TO_MICROVOLTS.get(unit, 1.0))


def read_edf(
    data: bytes, modality: str = "eeg", max_duration_s: float = MAX_DURATION_S
) -> EEGRecord:
    """EDF or EDF+ bytes -> EEGRecord; corrupt, truncated, non-EDF or (by its header) too large
    a recording -> InputError."""
    edf, rates = _read_header(data, modality)
    _check_size(edf, rates, modality, max_duration_s)
    try:
        signals = [(s.label.strip(), _microvolts(s)) for s in edf.signals]
    except Exception as e:
        raise _invalid(modality, e) from None
    rate = max(rates)
    rows = [resample(values, hz, rate) for (_, values), hz in zip(signals, rates, strict=True)]
    samples = min(len(r) for r in rows)  # resampled lengths can differ by a rounding sample
    return EEGRecord(
        data=np.stack([r[:samples] for r in rows]).astype(np.float32),
        channels=tuple(label for label, _ in signals),
        sample_rate_hz=float(rate),
    )


def _invalid(modality: str, e: Exception) -> InputError:
    # edfio reports malformed files with assorted exception types (ValueError, IndexError,
    # ZeroDivisionError, ...); for untrusted bytes every one of them means "not a valid EDF".
    return InputError(modality, f"not a valid EDF file ({type(e).__name__}: {e})")


def _read_header(data: bytes, modality: str) -> tuple[edfio.Edf, list[float]]:
    """The parsed header and each signal's sample rate. Samples stay unread until accessed
    (edfio's lazy loading)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InputError(modality, f"EDF input must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:  # the signal count first: edfio parses each signal's 256-byte header into an object
        signals = int(data[252:256].decode("ascii"))
    except ValueError as e:
        raise _invalid(modality, e) from None
    if signals > MAX_SIGNALS:
        raise InputError(
            modality, f"EDF header declares {signals} signals, over the {MAX_SIGNALS} limit"
        )
    try:
        edf = edfio.read_edf(data, lazy_load_data=True)
        declared = int(data[236:244].decode("ascii"))
        rates = [s.sampling_frequency for s in edf.signals]  # a zero record duration raises
    except Exception as e:
        raise _invalid(modality, e) from None
    # edfio only warns on a short file and trims to the complete records; -1 means "unknown".
    if declared not in (-1, edf.num_data_records):
        raise InputError(
            modality,
            f"EDF file is truncated: header declares {declared} data records, "
            f"file holds {edf.num_data_records}",
        )
    if not rates or edf.num_data_records == 0:
        raise InputError(modality, "EDF file contains no signal data")
    return edf, rates


def _check_size(edf: edfio.Edf, rates: list[float], modality: str, max_duration_s: float):
    """The header's duration and rates, and the recording's size once resampled."""
    if not all(0 < hz <= MAX_RATE_HZ for hz in rates):  # NaN fails too
        raise InputError(
            modality,
            f"EDF sample rates {min(rates):g}..{max(rates):g} Hz; allowed up to {MAX_RATE_HZ:g} Hz",
        )
    if max(rates) > MAX_RESAMPLE_FACTOR * min(rates):
        raise InputError(
            modality,
            f"EDF sample rates {min(rates):g} and {max(rates):g} Hz differ over "
            f"{MAX_RESAMPLE_FACTOR}-fold",
        )
    duration_s = edf.num_data_records * edf.data_record_duration  # > 0, as the rates are
    if duration_s > max_duration_s:
        raise InputError(
            modality, f"EDF recording lasts {duration_s:.1f} s > maximum {max_duration_s:g} s"
        )
    values = len(rates) * max(rates) * duration_s
    if values > MAX_VALUES:
        raise InputError(
            modality,
            f"EDF recording is {values:.3g} values resampled to {max(rates):g} Hz, "
            f"over the {MAX_VALUES} limit",
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
