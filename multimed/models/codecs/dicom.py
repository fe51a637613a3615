"""DICOM read and write with pydicom, following the standard's pixel conventions.

Reading returns values in modality units (the modality LUT applied: Hounsfield units for CT);
`to_display` then applies the VOI window and MONOCHROME1 inversion for a [0, 1] picture.
Layouts: grayscale [H, W] or [F, H, W] (multi-frame); RGB [H, W, 3] in stored units (0..255).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from multimed.models.errors import InputError

# Refuse before decoding anything larger: 2**27 voxels is a 512^3 volume (512 MiB as float32).
MAX_VOXELS = 2**27
_UINT16_MAX = 65535


def load_dicom(data: bytes, modality: str) -> Dataset:
    """Parse one DICOM file and check it holds pixel data of an acceptable size."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InputError(modality, f"DICOM input must be bytes, got {type(data).__name__}")
    try:
        ds = pydicom.dcmread(BytesIO(bytes(data)))
    except Exception as e:  # pydicom raises many exception types on corrupt input
        raise InputError(modality, f"not a readable DICOM file ({e})") from None
    if "PixelData" not in ds:
        raise InputError(modality, "DICOM file has no pixel data")
    try:
        voxels = _frames(ds) * int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):
        raise InputError(modality, "DICOM file lacks valid Rows/Columns") from None
    if voxels > MAX_VOXELS:
        raise InputError(modality, f"DICOM image has {voxels} values, over the {MAX_VOXELS} limit")
    return ds


def pixel_values(ds: Dataset, modality: str) -> np.ndarray:
    """Decoded pixels in modality units, float32 (see the module docstring for layouts)."""
    try:
        stored = ds.pixel_array
    except Exception as e:  # truncated data, unsupported compression, inconsistent tags
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise InputError(modality, f"cannot decode DICOM pixel data ({syntax}): {e}") from None
    if is_rgb(ds):  # the modality LUT applies to grayscale only
        return stored.astype(np.float32)
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def read_dicom(data: bytes, modality: str) -> np.ndarray:
    """One DICOM file -> float32 in modality units: [H, W], [F, H, W] or RGB [H, W, 3]."""
    return pixel_values(load_dicom(data, modality), modality)


def is_rgb(ds: Dataset) -> bool:
    return int(ds.get("SamplesPerPixel", 1)) == 3


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def apply_window(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]."""
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    else:  # LINEAR, the default; width 1 degenerates to a threshold
        out = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_display(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """Modality values -> [0, 1] as a viewer would show them: the file's first VOI window (or
    the value range when it has none), inverted for MONOCHROME1. RGB is scaled by bit depth."""
    if is_rgb(ds):
        return values / float(2 ** int(ds.get("BitsStored", 8)) - 1)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        function = ds.get("VOILUTFunction", "LINEAR")
        out = apply_window(values, _first(center), _first(width), function)
    else:
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # MONOCHROME1: high values are dark
        out = 1.0 - out
    return out.astype(np.float32)


def _first(value) -> float:
    """A file may list several windows; viewers default to the first."""
    return float(value[0] if isinstance(value, MultiValue) else value)


def read_dicom_series(files: list[bytes], modality: str) -> np.ndarray:
    """A series (one file per slice, or a single multi-frame file) -> float32 [D, H, W] in
    modality units, slices in spatial order along the slice normal."""
    if not isinstance(files, list | tuple) or not files:
        raise InputError(modality, "DICOM series must be a non-empty list of files")
    datasets = [load_dicom(f, modality) for f in files]
    if any(is_rgb(ds) for ds in datasets):
        raise InputError(modality, "a volume must be grayscale, got an RGB DICOM")
    if len(datasets) == 1:
        values = pixel_values(datasets[0], modality)
        return values if values.ndim == 3 else values[None]
    if any(_frames(ds) > 1 for ds in datasets):
        raise InputError(modality, "a multi-file series must hold one frame per file")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise InputError(modality, f"files belong to {len(series)} different series")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) > 1:
        raise InputError(modality, f"slices differ in Rows/Columns: {sorted(shapes)}")
    if len(datasets) * int(datasets[0].Rows) * int(datasets[0].Columns) > MAX_VOXELS:
        raise InputError(modality, f"series has over {MAX_VOXELS} voxels")
    return np.stack([pixel_values(ds, modality) for ds in _spatial_order(datasets)])


def _spatial_order(datasets: list[Dataset]) -> list[Dataset]:
    """Sort by position projected on the slice normal; else by InstanceNumber; else as sent."""
    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets):
        orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        return sorted(datasets, key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))
    if all(ds.get("InstanceNumber") is not None for ds in datasets):
        return sorted(datasets, key=lambda ds: int(ds.InstanceNumber))
    return datasets


# --- writing ---


def _quantise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Float modality values -> (stored ints, slope, intercept). Integer data that fits int16 is
    stored exactly (as CT HU usually is); anything else spans uint16 linearly."""
    lo, hi = float(values.min()), float(values.max())
    if np.array_equal(values, np.round(values)) and lo >= -32768 and hi <= 32767:
        return values.astype(np.int16), 1.0, 0.0
    # Slope and intercept are written as DICOM decimal strings (16 chars): quantise with the
    # values a reader will see, not the unrounded ones.
    intercept = float(format_number_as_ds(lo))
    slope = float(format_number_as_ds(max(hi - intercept, 1e-6) / _UINT16_MAX))
    stored = np.clip(np.round((values - intercept) / slope), 0, _UINT16_MAX).astype(np.uint16)
    return stored, slope, intercept


def _full_range_window(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    return (lo + hi) / 2, max(hi - lo, 1.0)


def _dataset(
    image: np.ndarray,
    modality_code: str,
    *,
    monochrome1: bool,
    window: tuple[float, float] | None,
    study_uid: str,
    series_uid: str,
    rescale: tuple[np.ndarray, float, float] | None = None,
) -> Dataset:
    image = np.asarray(image)
    rgb = image.ndim == 3 and image.shape[-1] == 3
    if image.ndim not in (2, 3) or not np.isfinite(image).all():
        raise ValueError(f"cannot write image of shape {image.shape} (or with NaN/Inf)")
    multiframe = image.ndim == 3 and not rgb
    ds = Dataset()
    # Secondary Capture: our images are synthesised, and its IOD needs no acquisition attributes.
    ds.SOPClassUID = (
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage
        if multiframe
        else SecondaryCaptureImageStorage
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = modality_code
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.ConversionType = "ANONYMOUS", "WSD"
    if rgb:
        ds.set_pixel_data(np.clip(np.round(image), 0, 255).astype(np.uint8), "RGB", 8)
    else:
        stored, slope, intercept = rescale or _quantise(image.astype(np.float64))
        photometric = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        ds.set_pixel_data(stored, photometric, 16)
        ds.RescaleSlope = format_number_as_ds(slope)
        ds.RescaleIntercept = format_number_as_ds(intercept)
        ds.RescaleType = "HU" if modality_code == "CT" else "US"
        center, width = window or _full_range_window(image)
        ds.WindowCenter = format_number_as_ds(float(center))
        ds.WindowWidth = format_number_as_ds(float(width))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID  # set by set_pixel_data
    return ds


def _to_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom(
    image: np.ndarray,
    modality_code: str,
    *,
    monochrome1: bool = False,
    window: tuple[float, float] | None = None,
) -> bytes:
    """Float values in modality units -> one DICOM file (Explicit VR Little Endian).

    image: [H, W], [F, H, W] (multi-frame) or [H, W, 3] (RGB, 0..255). Grayscale is stored as
    int16/uint16 with RescaleSlope/Intercept; window = (center, width) defaults to the value
    range. modality_code is the DICOM Modality: CR/DX, CT, MR, OPT, SM.
    """
    ds = _dataset(
        image,
        modality_code,
        monochrome1=monochrome1,
        window=window,
        study_uid=generate_uid(),
        series_uid=generate_uid(),
    )
    return _to_bytes(ds)


def write_dicom_series(
    volume: np.ndarray, modality_code: str, *, slice_thickness_mm: float = 1.0
) -> list[bytes]:
    """[D, H, W] in modality units -> one DICOM file per slice of one axial series."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be [D, H, W], got shape {volume.shape}")
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    # One rescale for the whole volume so every slice is quantised alike.
    stored, slope, intercept = _quantise(volume.astype(np.float64))
    window = _full_range_window(volume)
    files = []
    for i, plane in enumerate(volume):
        ds = _dataset(
            plane,
            modality_code,
            monochrome1=False,
            window=window,
            study_uid=study_uid,
            series_uid=series_uid,
            rescale=(stored[i], slope, intercept),
        )
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = i + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = ["0", "0", format_number_as_ds(i * slice_thickness_mm)]
        ds.SliceThickness = format_number_as_ds(slice_thickness_mm)
        ds.PixelSpacing = [1, 1]
        files.append(_to_bytes(ds))
    return files
