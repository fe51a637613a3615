"""Imaging I/O (DICOM, PNG) and the 2-D and volume pipelines."""

from io import BytesIO

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.data import get_testdata_file

from multimed.models.catalog import InputForm
from multimed.models.codecs.dicom import (
    apply_window,
    read_dicom,
    read_dicom_series,
    write_dicom,
    write_dicom_series,
)
from multimed.models.codecs.image import read_image, write_png
from multimed.models.errors import InputError
from multimed.models.inputs import RawInput
from multimed.models.modalities.ct import CTPipeline
from multimed.models.modalities.mri import SAMPLE, MRIPipeline, tail_percentiles
from multimed.models.modalities.oct import OCTPipeline
from multimed.models.modalities.pathology import PathologyPipeline
from multimed.models.modalities.xray import XrayPipeline

PIPELINES = (XrayPipeline, OCTPipeline, PathologyPipeline, CTPipeline, MRIPipeline)
rng = np.random.default_rng(0)


def sample_file(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as f:
        return f.read()


def raw(pipeline, form: InputForm, data) -> RawInput:
    return RawInput(pipeline.modality, form, data)


def resave(data: bytes, **changes) -> bytes:
    """Edit tags of an encoded DICOM (None deletes one)."""
    ds = pydicom.dcmread(BytesIO(data))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# --- PNG ---


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip(channels):
    image = rng.random((channels, 20, 30)).astype(np.float32)
    back = read_image(write_png(image), "xray", channels)
    assert back.shape == image.shape and back.dtype == np.float32
    assert np.abs(back - image).max() <= 0.5 / 255 + 1e-6


def test_16_bit_png_is_scaled_not_clipped():
    pixels = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    back = read_image(buffer.getvalue(), "xray", 1)[0]
    np.testing.assert_allclose(back, pixels / 65535.0, atol=1e-6)


def test_oversized_image_is_rejected_before_decoding():
    buffer = BytesIO()
    Image.new("L", (5000, 10)).save(buffer, format="PNG")
    with pytest.raises(InputError, match=r"^xray: .*over 4096"):
        read_image(buffer.getvalue(), "xray", 1)


# --- DICOM ---


def test_pydicom_samples_decode_in_modality_units():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = read_dicom(sample_file("CT_small.dcm"), "ct")
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(hu, expected)
    assert hu.dtype == np.float32 and hu.min() >= -1100 and hu.max() <= 3100  # plausible HU
    for pipeline, name in [(CTPipeline(), "CT_small.dcm"), (MRIPipeline(), "MR_small.dcm")]:
        out = pipeline.prepare(raw(pipeline, InputForm.DICOM, sample_file(name)))["volume"]
        assert out.shape == (16, 64, 64) and torch.isfinite(out).all()
    out = XrayPipeline().prepare(raw(XrayPipeline, InputForm.DICOM, sample_file("MR_small.dcm")))
    assert out["image"].shape == (1, 64, 64)


def test_dicom_round_trip_within_quantisation():
    values = rng.normal(100.0, 50.0, (12, 10)).astype(np.float32)
    data = write_dicom(values, "MR")
    slope = float(pydicom.dcmread(BytesIO(data)).RescaleSlope)
    assert np.abs(read_dicom(data, "mri") - values).max() <= slope / 2 + 1e-4
    hu = rng.integers(-1024, 3000, (9, 11)).astype(np.float32)  # integers are stored exactly
    np.testing.assert_array_equal(read_dicom(write_dicom(hu, "CT"), "ct"), hu)


def test_monochrome1_decodes_to_inverse():
    values = rng.random((16, 16)).astype(np.float32) * 1000
    pipeline = XrayPipeline()
    m2 = pipeline.decode(raw(pipeline, InputForm.DICOM, write_dicom(values, "DX")))
    m1 = pipeline.decode(
        raw(pipeline, InputForm.DICOM, write_dicom(values, "DX", monochrome1=True))
    )
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m2.min() == 0.0 and m2.max() == 1.0  # default window spans the value range


def test_windowing():
    values = np.linspace(-200, 200, 81, dtype=np.float32)
    out = apply_window(values, 0.0, 100.0, "LINEAR_EXACT")
    assert out[values <= -50].max() == 0.0 and out[values >= 50].min() == 1.0
    assert out[values == 0][0] == pytest.approx(0.5)
    image = np.tile(values, (8, 1))  # the file's own window drives 2-D display
    pipeline = XrayPipeline()
    shown = pipeline.decode(
        raw(pipeline, InputForm.DICOM, write_dicom(image, "DX", window=(0, 100)))
    )
    np.testing.assert_allclose(shown[0], apply_window(image, 0.0, 100.0), atol=1e-3)
    ct = CTPipeline({"window_center": 40, "window_width": 400})  # CT: the settings window
    np.testing.assert_allclose(ct.intensity(np.array([-160.0, 40.0, 240.0])), [0, 0.5, 1])


def test_rgb_dicom():
    rgb = rng.integers(0, 256, (10, 12, 3)).astype(np.float32)
    data = write_dicom(rgb, "SM")
    np.testing.assert_array_equal(read_dicom(data, "pathology"), rgb)
    tile = PathologyPipeline().decode(raw(PathologyPipeline, InputForm.DICOM, data))
    np.testing.assert_allclose(tile, rgb.transpose(2, 0, 1) / 255.0, atol=1e-6)
    gray = XrayPipeline().decode(raw(XrayPipeline, InputForm.DICOM, data))
    assert gray.shape == (1, 10, 12)  # luminance, as for a PNG


def test_series_comes_back_in_spatial_order():
    volume = rng.normal(0, 300, (6, 16, 16)).astype(np.float32)
    files = write_dicom_series(volume, "CT")
    shuffled = [files[i] for i in (3, 0, 5, 1, 4, 2)]
    slope = float(pydicom.dcmread(BytesIO(files[0])).RescaleSlope)
    assert np.abs(read_dicom_series(shuffled, "ct") - volume).max() <= slope / 2 + 1e-3
    # Without positions the InstanceNumber orders the slices.
    stripped = [resave(f, ImagePositionPatient=None) for f in shuffled]
    assert np.abs(read_dicom_series(stripped, "ct") - volume).max() <= slope / 2 + 1e-3
    pipeline = CTPipeline()
    assert pipeline.decode(raw(pipeline, InputForm.DICOM_SERIES, shuffled)).shape == (6, 16, 16)


def test_multi_frame_is_a_volume_not_a_2d_image():
    volume = rng.normal(500, 100, (4, 16, 16)).astype(np.float32)
    data = write_dicom(volume, "MR")
    assert read_dicom(data, "mri").shape == (4, 16, 16)
    assert MRIPipeline().decode(raw(MRIPipeline, InputForm.DICOM, data)).shape == (4, 16, 16)
    with pytest.raises(InputError, match="xray: multi-frame"):
        XrayPipeline().decode(raw(XrayPipeline, InputForm.DICOM, data))


# --- pipelines: bad input ---

_slice = write_dicom_series(np.zeros((2, 16, 16), np.float32), "CT")
_other_series = write_dicom_series(np.zeros((1, 16, 16), np.float32), "CT")[0]
_smaller = resave(_slice[1], Rows=8, PixelData=bytes(256))
BAD_INPUTS = [
    (CTPipeline, InputForm.DICOM, b"DICM not really a dicom file"),
    (XrayPipeline, InputForm.DICOM, sample_file("CT_small.dcm")[:3000]),  # truncated pixel data
    (XrayPipeline, InputForm.IMAGE, b"%PDF-1.4 not an image"),
    (OCTPipeline, InputForm.IMAGE, "a string, not bytes"),
    (XrayPipeline, InputForm.TENSOR, np.full((16, 16), np.nan)),
    (MRIPipeline, InputForm.TENSOR, np.zeros((2, 2, 16, 16))),
    (MRIPipeline, InputForm.TENSOR, np.zeros((0, 16, 16))),
    (PathologyPipeline, InputForm.TENSOR, np.zeros((16, 16))),  # 1 channel, needs 3
    (OCTPipeline, InputForm.TENSOR, np.full((16, 16), 2.0)),  # outside [0, 1]
    (XrayPipeline, InputForm.TENSOR, np.zeros((4, 4))),  # too small
    (CTPipeline, InputForm.DICOM_SERIES, [_slice[0], _other_series]),
    (CTPipeline, InputForm.DICOM_SERIES, [_slice[0], _smaller]),
    (CTPipeline, InputForm.DICOM_SERIES, []),
    (CTPipeline, InputForm.TEXT, "a note"),
    (XrayPipeline, InputForm.DICOM_SERIES, _slice),
]


@pytest.mark.parametrize(("cls", "form", "data"), BAD_INPUTS)
def test_bad_input_raises_input_error_naming_the_modality(cls, form, data):
    pipeline = cls()
    with pytest.raises(InputError, match=f"^{pipeline.modality}: "):
        pipeline.prepare(raw(pipeline, form, data))


@pytest.mark.parametrize("cls", [CTPipeline, MRIPipeline])
@pytest.mark.parametrize("value", [0.0, 1234.0])
def test_constant_volume_gives_no_nan(cls, value):
    pipeline = cls()
    out = pipeline.prepare(raw(pipeline, InputForm.TENSOR, np.full((3, 16, 16), value)))
    assert out["volume"].shape == (16, 64, 64) and torch.isfinite(out["volume"]).all()


@pytest.mark.parametrize("cls", PIPELINES)
def test_an_input_at_the_model_size_is_not_resampled_yet_equals_resampling(cls):
    """Resampling to the same size is the identity, so preprocessing skips it (measured: 2.5 ms
    of a CT's 3.7 ms on the serving path); the result must equal what resampling gives."""
    pipeline = cls()
    volume = isinstance(pipeline, CTPipeline | MRIPipeline)
    shape = (16, 64, 64) if volume else (pipeline.channels, 64, 64)
    data = rng.random(shape).astype(np.float32)
    out = pipeline.prepare(raw(pipeline, InputForm.TENSOR, data))
    key = "volume" if volume else "image"
    x = out[key][None, None] if volume else out[key][None]
    mode = "trilinear" if volume else "bilinear"
    extra = {} if volume else {"antialias": True}
    resampled = F.interpolate(x, size=x.shape[2:], mode=mode, align_corners=False, **extra)
    assert out[key].shape == shape
    torch.testing.assert_close(resampled.reshape(shape), out[key], atol=1e-6, rtol=0)


def _volumes():
    """Volumes that make the tails' thresholds work: ties, a sorted volume (every strided
    sample value is in order), a large offset, a heavy tail, and one whose strided positions
    hold its smallest values (the sample misjudges the low tail: numpy's whole partition)."""
    r = np.random.default_rng(7)
    yield "uniform", r.random((16, 128, 128), dtype=np.float32)
    yield "ties", r.integers(0, 5, (16, 64, 64)).astype(np.float32)
    yield "sorted", np.sort(r.exponential(1, 16 * 64 * 64)).astype(np.float32).reshape(16, 64, 64)
    yield "offset", r.normal(1000, 1, (8, 100, 117)).astype(np.float32)
    yield "heavy tail", (r.random((1, 256, 256)) ** 8 * 4000).astype(np.float32)
    yield "constant", np.full((16, 64, 64), 7.5, np.float32)
    yield "small", r.random((3, 16, 16), dtype=np.float32)
    fooled = r.random(16 * 128 * 128).astype(np.float32) + 1
    fooled[:: fooled.size // SAMPLE] = np.linspace(0, 1, len(fooled[:: fooled.size // SAMPLE]))
    yield "fooled sample", fooled.reshape(16, 128, 128)


@pytest.mark.parametrize("name, volume", list(_volumes()), ids=[n for n, _ in _volumes()])
def test_mri_percentiles_equal_numpys_bit_for_bit(name, volume):
    """MRI inputs are scaled by their 1st/99th percentiles: the fast selection must give what
    np.percentile gave the model in training, exactly."""
    for low, high in ((1.0, 99.0), (0.5, 99.5), (5.0, 95.0)):
        got, expected = tail_percentiles(volume, low, high), np.percentile(volume, [low, high])
        assert got.dtype == expected.dtype and np.array_equal(got, expected), (low, high)


# --- encoders ---


def _tensor_input(pipeline) -> np.ndarray:
    if isinstance(pipeline, CTPipeline | MRIPipeline):
        return rng.normal(0, 100, (5, 24, 20)).astype(np.float32)
    return rng.random((pipeline.channels, 24, 20)).astype(np.float32)


@pytest.mark.parametrize("cls", PIPELINES)
def test_encoder_shape_and_batch_invariance(cls):
    torch.manual_seed(0)
    pipeline = cls(embed_dim=24).setup()
    raws = [raw(pipeline, InputForm.TENSOR, _tensor_input(pipeline)) for _ in range(3)]
    batch = pipeline.encode(raws).pooled
    assert batch.shape == (3, 24)
    single = torch.cat([pipeline.encode([r]).pooled for r in raws])
    torch.testing.assert_close(single, batch, atol=1e-5, rtol=0)
