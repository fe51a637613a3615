"""Limits before work, and never a wrong OK: each bomb class is built with the real library and
must be refused by name, cheaply (peak traced memory and time); values that would turn into
NaN after decoding are refused instead of answered."""

import struct
import time
import tracemalloc
import zlib

import bombs
import edfio
import numpy as np
import pytest
import torch
from bombs import XRAY, edf_bytes, edited
from pydicom.uid import DeflatedExplicitVRLittleEndian

from multimed.client.files import read_input
from multimed.models.catalog import PBMC_GENES, InputForm
from multimed.models.codecs import dicom, edf
from multimed.models.codecs.dicom import read_dicom, write_dicom, write_dicom_series
from multimed.models.codecs.edf import write_edf
from multimed.models.codecs.sequence import write_fasta
from multimed.models.codecs.types import EEGRecord
from multimed.models.cohort.writer import FILES, write_cohort
from multimed.models.config import ModelConfig
from multimed.models.errors import InputError
from multimed.models.inputs import RawInput
from multimed.models.modalities.eeg import BCI_IV_2A_CHANNELS, EEGPipeline
from multimed.models.modalities.registry import PIPELINES, build_pipeline
from multimed.services.offload import decoding_is_light

F = InputForm
CONFIG = ModelConfig()
MAX_PEAK_MB, MAX_SECONDS = 50, 1.0


def refused_cheaply(modality: str, form: InputForm, data, match: str) -> None:
    """prepare() raises an InputError matching `match`, within the memory and time budget."""
    pipeline = build_pipeline(modality, CONFIG)
    raw = RawInput(modality, form, data)
    tracemalloc.start()  # numpy registers its buffers with tracemalloc too
    start = time.perf_counter()
    try:
        with pytest.raises(InputError, match=f"^{modality}: .*{match}"):
            pipeline.prepare(raw)
        seconds = time.perf_counter() - start
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak_mb < MAX_PEAK_MB, f"refusal peaked at {peak_mb:.0f} MB"
    assert seconds < MAX_SECONDS, f"refusal took {seconds:.2f} s"


# --- DICOM ---


@pytest.fixture(scope="module")
def deflate_bomb() -> bytes:
    data = bombs.deflate_bomb()
    assert len(data) < 200_000
    return data


def test_deflated_dicom_bomb_is_refused_before_inflating(deflate_bomb):
    refused_cheaply("xray", F.DICOM, deflate_bomb, f"over {dicom.MAX_BYTES} bytes once inflated")
    # In a series each file gets its share of the budget: one bomb among small slices fails.
    slices = write_dicom_series(np.zeros((2, 16, 16), np.float32), "CT")
    refused_cheaply("ct", F.DICOM_SERIES, [slices[0], deflate_bomb], "once inflated")


def test_deflated_dicom_within_the_limit_decodes():
    values = np.zeros((1024, 1024), np.float32)  # 2 MiB inflated: more than one measuring step
    values[::7, ::5] = 1000.0
    plain = write_dicom(values, "CT")
    deflated = edited(plain, syntax=DeflatedExplicitVRLittleEndian)
    assert len(deflated) < len(plain)
    # pydicom pads an odd-length deflate stream with a byte after its end: measuring the inflated
    # size must stop at the end, not wait for that byte to be consumed.
    for data in (deflated, deflated + b"\0"):
        np.testing.assert_array_equal(read_dicom(data, "ct"), values)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"Rows": 60000, "Columns": 60000}, "60000x60000; sides must be 1..4096"),
        ({"Rows": 4096, "Columns": 4096, "NumberOfFrames": 64}, "values, over the 16777216"),
        ({"Rows": 64, "Columns": 64}, "holds 2048 bytes, its header declares 8192"),
        ({"Rows": 0}, "32x0"),
        ({"BitsAllocated": 0}, "must be positive"),
    ],
)
def test_declared_pixel_size_is_checked_before_decoding(changes, match):
    refused_cheaply("xray", F.DICOM, edited(XRAY, **changes), match)


def test_series_file_count_is_refused_before_parsing():
    one = write_dicom_series(np.zeros((1, 16, 16), np.float32), "CT")[0]
    files = [one] * 20_000
    refused_cheaply("ct", F.DICOM_SERIES, files, "20000 files, over the 1024 limit")
    refused_cheaply("ct", F.DICOM_SERIES, files[: dicom.MAX_SERIES_FILES + 1], "1025 files")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom warns; we refuse
@pytest.mark.parametrize(
    ("modality", "changes", "attribute"),
    [
        ("xray", {"WindowCenter": "NaN"}, "WindowCenter is not a finite number"),
        ("xray", {"WindowWidth": "Inf"}, "WindowWidth is not a finite number"),
        ("xray", {"WindowWidth": "0"}, "WindowWidth must be positive"),
        ("xray", {"WindowWidth": "-10"}, "WindowWidth must be positive"),
        ("ct", {"RescaleSlope": "NaN"}, "RescaleSlope is not a finite number"),
        ("mri", {"RescaleIntercept": "-Inf"}, "RescaleIntercept is not a finite number"),
        ("mri", {"RescaleSlope": "1e300"}, "overflow float32"),
    ],
)
def test_non_finite_dicom_scaling_is_refused_by_name(modality, changes, attribute):
    data = edited(write_dicom(np.full((16, 16), 40.0), "CT"), **changes)
    refused_cheaply(modality, F.DICOM, data, attribute)


def test_bad_slice_positions_are_input_errors():
    slices = write_dicom_series(np.zeros((2, 16, 16), np.float32), "CT")
    bad = [edited(s, ImageOrientationPatient=[1, 0]) for s in slices]
    refused_cheaply("ct", F.DICOM_SERIES, bad, "slice position or number is not valid")


# --- images ---


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit gray) and whose data is one row."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, no interlace
    row = zlib.compress(bytes(width + 1))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row)
    return png + chunk(b"IEND", b"")


def test_image_size_is_checked_from_the_header():
    refused_cheaply("oct", F.IMAGE, png_header(8192, 8192), "8192x8192, over 4096")
    refused_cheaply("oct", F.IMAGE, png_header(30000, 30000), "decompression bomb")
    refused_cheaply("xray", F.TENSOR, np.full((16, 16), np.inf), "NaN or Inf")


# --- EDF ---


def eeg_edf(seconds: int = 4, rate: int = 128) -> bytes:
    data = np.zeros((len(BCI_IV_2A_CHANNELS), seconds * rate), np.float32)
    return write_edf(EEGRecord(data, BCI_IV_2A_CHANNELS, float(rate)))


def with_record_duration(data: bytes, field: bytes) -> bytes:
    """Patch the header's 8-character record duration (bytes 244..252)."""
    return data[:244] + field.ljust(8) + data[252:]


def test_edf_signal_count_is_refused_from_the_header():
    signals = [edfio.EdfSignal(np.zeros(4), 1, label=f"S{i}") for i in range(1000)]
    refused_cheaply("eeg", F.EDF, edf_bytes(signals), "declares 1000 signals, over the 256")


def test_edf_duration_and_rates_are_refused_from_the_header():
    data = eeg_edf()
    refused_cheaply("eeg", F.EDF, with_record_duration(data, b"99999999"), "lasts 399999996.0 s")
    refused_cheaply("eeg", F.EDF, with_record_duration(data, b"0.000001"), "allowed up to 16384")
    mixed = [edfio.EdfSignal(np.zeros(10), 1, label="Fz"), edfio.EdfSignal(np.zeros(20000), 2000)]
    refused_cheaply("eeg", F.EDF, edf_bytes(mixed), "differ over 1000-fold")


def test_edf_resampled_size_is_refused_before_resampling():
    data = bombs.resample_bomb()
    assert len(data) < 2_000_000
    refused_cheaply("eeg", F.EDF, data, "values resampled to 1000 Hz, over the 16777216 limit")


def test_edf_duration_limit_is_the_pipelines():
    pipeline = EEGPipeline({"max_duration_s": 2})
    with pytest.raises(InputError, match=r"EDF recording lasts 4\.0 s > maximum 2 s"):
        pipeline.prepare(RawInput("eeg", F.EDF, eeg_edf()))
    assert edf.read_edf(eeg_edf()).data.shape == (22, 512)  # the codec's own default is wider


def test_eeg_rate_too_far_from_the_encoders_is_refused():
    data = np.zeros((22, 30), np.float32)  # 300 s at 0.1 Hz
    record = write_edf(EEGRecord(data, BCI_IV_2A_CHANNELS, 0.1))
    refused_cheaply("eeg", F.EDF, record, "over 1000-fold from the encoder's 128 Hz")


def test_eeg_huge_finite_values_normalise_without_overflow():
    """Float32 sums of 1e37 overflow: the pipeline must give the same signal as at unit scale."""
    pipeline = EEGPipeline()
    unit = np.random.default_rng(0).normal(size=(22, 512)).astype(np.float32)
    small = pipeline.prepare(RawInput("eeg", F.TENSOR, unit))["signal"]
    huge = pipeline.prepare(RawInput("eeg", F.TENSOR, unit * np.float32(1e37)))["signal"]
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, small, atol=1e-5, rtol=1e-5)
    refused_cheaply("eeg", F.TENSOR, np.full((22, 512), 1e300), "NaN or Inf")  # past float32


# --- sequences and text ---


@pytest.mark.parametrize("modality", ["protein", "genomics"])
def test_long_bad_sequence_is_refused_before_scanning(modality):
    refused_cheaply(modality, F.SEQUENCE, "Z" * 4 * 2**20, "4194304 characters; maximum length")


def test_sequence_limits_after_whitespace_and_bad_letters_counted():
    spaced = " ".join("ACGT" * 501)  # raw text within 2 x max_length, sequence over it
    refused_cheaply("genomics", F.SEQUENCE, spaced, "length 2004 > maximum 2000")
    refused_cheaply("genomics", F.SEQUENCE, write_fasta("x", "Z" * 2000), "'Z' at 5 and 1995 more")


def test_long_text_is_refused_before_scanning():
    refused_cheaply("text", F.TEXT, "a" * 4 * 2**20, "4194304 characters; maximum 20000")
    refused_cheaply("text", F.TEXT, b"a" * 4 * 2**20, "4194304 bytes")


# --- scRNA ---


def test_huge_gene_map_is_refused_by_size():
    counts = {f"G{i}": 1.0 for i in range(1_500_000)}
    refused_cheaply("scrna", F.GENE_COUNTS, counts, "1500000 entries, over the 100000 limit")


GENE = PBMC_GENES[0]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2, 3], "map, got list"),
        (None, "map, got NoneType"),
        ("ACTB: 3", "map, got str"),
        ({GENE: {"nested": 1}}, "must be numbers"),
        ({GENE: True}, "must be numbers"),
        ({GENE: "3"}, "must be numbers"),
        ({GENE: None}, "must be numbers"),
        ({GENE: [1]}, "must be numbers"),
        ({1: 2.0, GENE: 1.0}, "gene names must be strings"),
        ({GENE: -3}, "negative"),
        ({GENE: 10**400}, "finite numbers"),
        ({GENE: 1e300}, "NaN or Inf"),  # past float32's range
        ({GENE: float("inf")}, "NaN or Inf"),
    ],
)
def test_gene_counts_of_any_shape_are_input_errors(data, match):
    refused_cheaply("scrna", F.GENE_COUNTS, data, match)


# --- the generic checks behind every decoder ---


def test_nan_after_decoding_is_refused_by_the_generic_check(monkeypatch):
    pipeline = build_pipeline("xray", CONFIG)
    monkeypatch.setattr(pipeline, "preprocess", lambda decoded: {"image": torch.full((1,), np.nan)})
    with pytest.raises(InputError, match=r"^xray: 'image' contains NaN or Inf after decoding"):
        pipeline.prepare(RawInput("xray", F.TENSOR, np.zeros((16, 16))))


@pytest.mark.parametrize("error", [RecursionError, MemoryError])
def test_codec_recursion_or_memory_error_is_this_inputs_error(monkeypatch, error):
    pipeline = build_pipeline("scrna", CONFIG)

    def choke(raw):
        raise error()

    monkeypatch.setattr(pipeline, "decode", choke)
    with pytest.raises(InputError, match=f"^scrna: input could not be decoded \\({error.__name__}"):
        pipeline.prepare(RawInput("scrna", F.GENE_COUNTS, {GENE: 1}))


# --- valid inputs stay valid ---


def test_written_cohort_still_prepares(tmp_path):
    """The files the integration and training tiers use pass every limit."""
    write_cohort(tmp_path, 2, seed=3)
    for patient in sorted(p for p in tmp_path.iterdir() if p.is_dir()):
        for modality, name in FILES.items():
            pipeline = build_pipeline(modality, CONFIG)
            batch = pipeline.prepare(read_input(modality, patient / name))
            assert batch, modality
    assert set(FILES) == set(PIPELINES)


@pytest.mark.parametrize(
    ("raw", "light"),
    [
        (RawInput("xray", InputForm.TENSOR, np.zeros((1, 64, 64), np.float32)), True),
        (RawInput("text", InputForm.TEXT, "Is there a lesion?"), True),
        (RawInput("ct", InputForm.TENSOR, np.zeros((16, 128, 128), np.float32)), False),
        (RawInput("xray", InputForm.DICOM, b"\0" * 1024), False),  # a file: always decoded apart
        (RawInput("ct", InputForm.DICOM_SERIES, [b"\0" * 10, b"\0" * 20]), False),
    ],
)
def test_only_small_arrays_and_strings_are_decoded_on_the_event_loop(raw, light):
    assert decoding_is_light([raw]) is light


def test_input_sizes_count_the_payload():
    assert RawInput("ct", InputForm.DICOM_SERIES, [b"ab", b"cde"]).size == 5
    assert RawInput("scrna", InputForm.GENE_COUNTS, {"CD3E": 1.0, "MS4A1": 2.0}).size == 32
    assert RawInput("xray", InputForm.TENSOR, np.zeros((2, 8), np.float32)).size == 64
