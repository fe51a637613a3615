"""DICOM read and write with pydicom, following the standard's pixel conventions.

Reading returns values in modality units (the modality LUT applied: Hounsfield units for CT);
`to_display` then applies the VOI window and MONOCHROME1 inversion for a [0, 1] picture.
Layouts: grayscale [H, W] or [F, H, W] (multi-frame); RGB [H, W, 3] in stored units (0..255).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from multimed.models.codecs.image import MAX_SIDE
from multimed.models.errors import InputError

# Limits, all checked from the header before anything is inflated or decoded. The pipelines read
# at most a 1024-px side (2-D) or 256 x 512 x 512 voxels (volumes), by default 64 px and
# 16 x 64 x 64. Rows and Columns share the 2-D image side limit, MAX_SIDE (4096).
# 2**24 values is a 4096 x 4096 radiograph or 64 CT slices of 512 x 512. Decoding costs about
# 17 bytes a value (stored ints, float64 modality LUT, float32): ~290 MB measured at the limit.
MAX_VOXELS = 2**24
# Parsed bytes of one input (a file, or a whole series): the voxel limit at 16 bits a value
# (32 MiB; CT, MR and DX store 16 bits, RGB 8) plus as much again for headers. For the deflate
# transfer syntax this is the inflated size, measured before pydicom inflates it all in one
# piece (which, under the limit, costs about twice the limit while parsing).
MAX_BYTES = 2**26
# Files in a series. A thin-slice CT has up to ~1000 (0.5 mm over 50 cm); each file is parsed
# before the series' voxels can be summed, so the count is refused first.
MAX_SERIES_FILES = 1024
_INFLATE_CHUNK = 2**20  # output bytes per step while measuring an inflated size (then discarded)
_UINT16_MAX = 65535


def load_dicom(data: bytes, modality: str, max_bytes: int = MAX_BYTES) -> Dataset:
    """Parse one DICOM file and check, from its header, that its pixel data can be decoded
    within the limits. Nothing is inflated past `max_bytes` and no pixel is decoded."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InputError(modality, f"DICOM input must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        size = _parsed_size(data, max_bytes)
    except Exception as e:  # pydicom and zlib raise many exception types on corrupt input
        raise InputError(modality, f"not a readable DICOM file ({e})") from None
    if size > max_bytes:
        raise InputError(modality, f"DICOM data is over {max_bytes} bytes once inflated")
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except Exception as e:
        raise InputError(modality, f"not a readable DICOM file ({e})") from None
    _check_pixel_data(ds, modality)
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        _number(ds, keyword, modality)
    return ds


def _parsed_size(data: bytes, limit: int) -> int:
    """The bytes pydicom will hold once it has parsed `data`: for the deflate transfer syntax
    the inflated size, measured in bounded steps with the output discarded, stopping once past
    `limit` (a few hundred KB of zeros inflate to gigabytes)."""
    fp = BytesIO(data)
    read_preamble(fp, force=False)
    meta = read_dataset(  # the file meta group (0002,xxxx) only, as pydicom reads it
        fp, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, *_: tag >> 16 != 2
    )
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return len(data)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as pydicom inflates it
    size, pending = 0, data[fp.tell() :]
    # Stop at the stream's end too: bytes after it (a padding byte) would stay unconsumed forever.
    while pending and not inflater.eof and size <= limit:
        size += len(inflater.decompress(pending, _INFLATE_CHUNK))
        pending = inflater.unconsumed_tail
    return size


def _check_pixel_data(ds: Dataset, modality: str) -> None:
    """Refuse pixel data whose declared size is over the limits, or (uncompressed) whose length
    is not the declared size; compressed data is decoded into the declared size only."""
    if "PixelData" not in ds:
        raise InputError(modality, "DICOM file has no pixel data")
    try:
        rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        frames, samples = _frames(ds), int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):
        raise InputError(
            modality, "DICOM file lacks valid Rows/Columns/BitsAllocated/NumberOfFrames"
        ) from None
    if min(rows, columns) < 1 or max(rows, columns) > MAX_SIDE:
        raise InputError(modality, f"DICOM image is {columns}x{rows}; sides must be 1..{MAX_SIDE}")
    if min(frames, samples, bits) < 1:
        raise InputError(
            modality, "DICOM NumberOfFrames, SamplesPerPixel and BitsAllocated must be positive"
        )
    voxels = frames * rows * columns * samples
    if voxels > MAX_VOXELS:
        raise InputError(modality, f"DICOM image has {voxels} values, over the {MAX_VOXELS} limit")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not UID(syntax).is_encapsulated:
        declared = (voxels * bits + 7) // 8
        held = len(ds.PixelData)
        if held not in (declared, declared + declared % 2):  # values are padded to even length
            raise InputError(
                modality, f"DICOM pixel data holds {held} bytes, its header declares {declared}"
            )


def _number(ds: Dataset, keyword: str, modality: str) -> float | None:
    """A numeric attribute's first value (files may list several); None when absent. NaN, Inf
    or unreadable values are refused by name: they would turn every pixel into NaN."""
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        result = float(value[0] if isinstance(value, MultiValue) else value)
    except (TypeError, ValueError, IndexError, OverflowError):
        result = math.nan
    if not math.isfinite(result):
        raise InputError(modality, f"DICOM {keyword} is not a finite number")
    return result


def pixel_values(ds: Dataset, modality: str) -> np.ndarray:
    """Decoded pixels in modality units, float32 (see the module docstring for layouts)."""
    try:
        stored = ds.pixel_array
    except Exception as e:  # truncated data, unsupported compression, inconsistent tags
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise InputError(modality, f"cannot decode DICOM pixel data ({syntax}): {e}") from None
    if is_rgb(ds):  # the modality LUT applies to grayscale only
        return stored.astype(np.float32)
    with np.errstate(over="ignore"):  # overflow is checked below, by name
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    if not np.isfinite(values).all():
        raise InputError(modality, "DICOM values overflow float32 after RescaleSlope/Intercept")
    return values


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


def to_display(ds: Dataset, values: np.ndarray, modality: str) -> np.ndarray:
    """Modality values -> [0, 1] as a viewer would show them: the file's first VOI window (or
    the value range when it has none), inverted for MONOCHROME1. RGB is scaled by bit depth."""
    if is_rgb(ds):
        return values / float(2 ** int(ds.get("BitsStored", 8)) - 1)
    center, width = _number(ds, "WindowCenter", modality), _number(ds, "WindowWidth", modality)
    if center is not None and width is not None:
        if width <= 0:
            raise InputError(modality, f"DICOM WindowWidth must be positive, got {width:g}")
        out = apply_window(values, center, width, ds.get("VOILUTFunction", "LINEAR"))
    else:
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # MONOCHROME1: high values are dark
        out = 1.0 - out
    return out.astype(np.float32)


def read_dicom_series(files: list[bytes], modality: str) -> np.ndarray:
    """A series (one file per slice, or a single multi-frame file) -> float32 [D, H, W] in
    modality units, slices in spatial order along the slice normal."""
    if not isinstance(files, list | tuple) or not files:
        raise InputError(modality, "DICOM series must be a non-empty list of files")
    if len(files) > MAX_SERIES_FILES:
        raise InputError(
            modality, f"DICOM series has {len(files)} files, over the {MAX_SERIES_FILES} limit"
        )
    # Slices are alike in size, so each file gets an equal share of the series' byte budget.
    datasets = [load_dicom(f, modality, MAX_BYTES // len(files)) for f in files]
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
    ordered = _spatial_order(datasets, modality)
    return np.stack([pixel_values(ds, modality) for ds in ordered])


def _spatial_order(datasets: list[Dataset], modality: str) -> list[Dataset]:
    """Sort by position projected on the slice normal; else by InstanceNumber; else as sent."""
    try:
        if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets):
            orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
            normal = np.cross(orientation[:3], orientation[3:6])
            keys = [float(np.dot(ds.ImagePositionPatient, normal)) for ds in datasets]
        elif all(ds.get("InstanceNumber") is not None for ds in datasets):
            keys = [float(ds.InstanceNumber) for ds in datasets]
        else:
            return datasets
    except (TypeError, ValueError) as e:  # wrong value counts, non-numeric strings
        raise InputError(modality, f"DICOM slice position or number is not valid ({e})") from None
    if not np.isfinite(keys).all():
        raise InputError(modality, "DICOM slice positions are not finite numbers")
    order = np.argsort(keys, kind="stable")  # stable: as sorted() ordered ties before
    return [datasets[i] for i in order]


# --- writing ---


@dataclass(frozen=True)
class SeriesInfo:
    """Who and what a written series belongs to: its patient, its study and its place there. A
    UID left empty is generated; with a series UID given, instance UIDs derive from it, so
    writing the same series again gives the same instances (a PACS keeps one copy)."""

    patient_id: str = "ANONYMOUS"
    patient_name: str = ""
    study_uid: str = ""
    study_date: str = ""  # YYYYMMDD
    accession_number: str = ""
    series_uid: str = ""
    series_number: int | None = None
    series_description: str = ""

    def instance_uid(self, index: int) -> str:
        return generate_uid(entropy_srcs=[self.series_uid, str(index)]) if self.series_uid else ""

    def apply(self, ds: Dataset, index: int) -> None:
        ds.PatientID, ds.PatientName = self.patient_id, self.patient_name
        ds.StudyDate, ds.AccessionNumber = self.study_date, self.accession_number
        if self.series_number is not None:
            ds.SeriesNumber = self.series_number
        if self.series_description:
            ds.SeriesDescription = self.series_description
        if uid := self.instance_uid(index):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid


NEW_SERIES = SeriesInfo()  # an anonymous patient, new study and series UIDs


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
    ds.ConversionType = "WSD"
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


def to_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM file (preamble and file meta), as a PACS or a pipeline reads it."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom(
    image: np.ndarray,
    modality_code: str,
    *,
    monochrome1: bool = False,
    window: tuple[float, float] | None = None,
    series: SeriesInfo = NEW_SERIES,
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
        study_uid=series.study_uid or generate_uid(),
        series_uid=series.series_uid or generate_uid(),
    )
    series.apply(ds, 0)
    return to_bytes(ds)


def write_dicom_series(
    volume: np.ndarray,
    modality_code: str,
    *,
    slice_thickness_mm: float = 1.0,
    series: SeriesInfo = NEW_SERIES,
) -> list[bytes]:
    """[D, H, W] in modality units -> one DICOM file per slice of one axial series."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be [D, H, W], got shape {volume.shape}")
    study_uid = series.study_uid or generate_uid()
    series_uid, frame_uid = series.series_uid or generate_uid(), generate_uid()
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
        series.apply(ds, i)
        files.append(to_bytes(ds))
    return files
