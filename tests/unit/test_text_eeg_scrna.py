"""EDF I/O and the text, EEG and scRNA pipelines."""

import io

import edfio
import numpy as np
import pytest
import torch

from multimed.models.catalog import PBMC_GENES, InputForm
from multimed.models.codecs.edf import read_edf, write_edf
from multimed.models.codecs.types import EEGRecord
from multimed.models.errors import InputError
from multimed.models.inputs import RawInput
from multimed.models.modalities.eeg import BCI_IV_2A_CHANNELS, EEGPipeline
from multimed.models.modalities.scrna import ScrnaPipeline
from multimed.models.modalities.text import TextPipeline

F = InputForm
RNG = np.random.default_rng(0)


def record(rate=128.0, seconds=4, channels=BCI_IV_2A_CHANNELS):
    data = RNG.normal(0, 20, (len(channels), int(rate * seconds))).astype(np.float32)
    return EEGRecord(data, tuple(channels), rate)


# --- EDF ---


def test_edf_round_trip():
    rec = record(rate=250.0, seconds=3)
    back = read_edf(write_edf(rec))
    assert back.channels == rec.channels and back.sample_rate_hz == 250.0
    np.testing.assert_allclose(back.data, rec.data, atol=0.01)  # 16-bit quantisation


def test_edf_plus_annotations_skipped_units_and_rates_unified():
    t = np.arange(512) / 128
    microvolts = np.sin(2 * np.pi * 5 * t) * 50
    millivolts = 0.02 + np.arange(256) * 1e-5
    signals = [
        edfio.EdfSignal(microvolts, 128, label="EEG Cz-REF", physical_dimension="uV"),
        edfio.EdfSignal(millivolts, 64, label="C3", physical_dimension="mV"),
    ]
    buffer = io.BytesIO()
    edfio.Edf(signals, annotations=[edfio.EdfAnnotation(0.5, None, "cue")]).write(buffer)
    rec = read_edf(buffer.getvalue())
    assert rec.channels == ("EEG Cz-REF", "C3")  # the "EDF Annotations" signal is skipped
    assert rec.sample_rate_hz == 128 and rec.data.shape == (2, 512)
    assert 15 < np.median(rec.data[1]) < 25  # mV -> uV


@pytest.mark.filterwarnings("ignore::UserWarning")  # edfio warns on truncation; we raise
@pytest.mark.parametrize(
    "mangle",
    [lambda b: b"", lambda b: b"not an edf file at all", lambda b: b[:300],
     lambda b: b[: len(b) - 100], lambda b: b"0" * 256 + b[256:]],
    ids=["empty", "text", "header-only", "truncated", "zeroed-header"],
)  # fmt: skip
def test_corrupt_edf_rejected(mangle):
    data = write_edf(record(seconds=2))
    with pytest.raises(InputError, match=r"^eeg: .*(not a valid EDF|truncated|no signal)"):
        read_edf(mangle(data))


# --- EEG pipeline ---


def eeg_raw(rec):
    return RawInput("eeg", F.EDF, write_edf(rec))


def test_eeg_edf_with_prefixed_names_and_extra_channels():
    names = [f"EEG {c.upper()}-REF" for c in BCI_IV_2A_CHANNELS] + ["ECG"]
    item = EEGPipeline().prepare(eeg_raw(record(channels=names)))
    signal = item["signal"]
    assert signal.shape == (22, 512) and signal.dtype == torch.float32
    torch.testing.assert_close(signal.mean(1), torch.zeros(22), atol=1e-4, rtol=0)
    # One scale for the whole recording keeps the channels' relative power.
    torch.testing.assert_close(signal.std(correction=0), torch.tensor(1.0), atol=1e-3, rtol=0)


def test_eeg_missing_channels_listed():
    rec = record(channels=BCI_IV_2A_CHANNELS[2:])
    with pytest.raises(InputError, match="missing channels: Fz, FC3"):
        EEGPipeline().prepare(eeg_raw(rec))


def test_eeg_resampling_keeps_frequency():
    t = np.arange(256 * 8) / 256
    sine = (np.sin(2 * np.pi * 10 * t) * 40).astype(np.float32)
    rec = EEGRecord(np.tile(sine, (22, 1)), BCI_IV_2A_CHANNELS, 256.0)
    signal = EEGPipeline().prepare(eeg_raw(rec))["signal"][0].numpy()
    assert signal.shape == (512,)  # 4 s at 128 Hz, centre-cropped from 8 s
    peak_hz = np.argmax(np.abs(np.fft.rfft(signal))) * 128 / len(signal)
    assert peak_hz == pytest.approx(10, abs=0.25)


def test_eeg_tensor_form_pads_short_and_checks_shape():
    pipeline = EEGPipeline()
    item = pipeline.prepare(RawInput("eeg", F.TENSOR, RNG.normal(size=(22, 300))))
    assert item["signal"].shape == (22, 512)
    assert (item["signal"][:, :100] == 0).all()  # centre zero-padding
    with pytest.raises(InputError, match=r"\[22 channels, samples\]"):
        pipeline.prepare(RawInput("eeg", F.TENSOR, np.zeros((21, 512))))
    bad = np.zeros((22, 512))
    bad[3, 7] = np.nan
    with pytest.raises(InputError, match="NaN"):
        pipeline.prepare(RawInput("eeg", F.TENSOR, bad))


def test_eeg_too_long_and_wrong_form():
    pipeline = EEGPipeline({"max_duration_s": 2})
    with pytest.raises(InputError, match="> maximum 2"):
        pipeline.prepare(eeg_raw(record(seconds=3)))
    with pytest.raises(InputError, match=r"^eeg: input form text is not accepted"):
        pipeline.prepare(RawInput("eeg", F.TEXT, "hello"))


def test_eeg_encoder_batch_invariance():
    torch.manual_seed(0)
    pipeline = EEGPipeline(size="tiny", embed_dim=32)
    assert pipeline.encoder is None
    pipeline.setup()
    raws = [RawInput("eeg", F.TENSOR, RNG.normal(size=(22, 512))) for _ in range(3)]
    batch = pipeline.encode(raws).pooled
    assert batch.shape == (3, 32)
    torch.testing.assert_close(batch[:1], pipeline.encode(raws[:1]).pooled, atol=1e-4, rtol=0)


# --- scRNA ---


def counts_raw(counts):
    return RawInput("scrna", F.GENE_COUNTS, counts)


def test_scrna_alignment_and_log_normalisation():
    pipeline = ScrnaPipeline()
    decoded = pipeline.decode(counts_raw({PBMC_GENES[1]: 3, PBMC_GENES[4]: 1, "NOTAGENE": 5}))
    assert decoded.counts.shape == (len(PBMC_GENES),)
    assert decoded.counts[1] == 3 and decoded.counts[4] == 1 and decoded.counts.sum() == 4
    assert decoded.unknown_genes == ("NOTAGENE",)
    expression = pipeline.preprocess(decoded)["expression"]
    assert expression[1].item() == pytest.approx(np.log1p(7500), rel=1e-5)
    assert expression[0].item() == 0


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ({}, "non-empty"),
        ({PBMC_GENES[0]: "3"}, "numbers"),
        ({PBMC_GENES[0]: -1.0}, "negative"),
        ({PBMC_GENES[0]: float("nan")}, "NaN"),
        ({PBMC_GENES[0]: 0, PBMC_GENES[1]: 0}, "zero"),
        ({PBMC_GENES[0]: 1, "FOO1": 1, "FOO2": 1}, "2 of 3 genes .* FOO1, FOO2"),
    ],
)
def test_scrna_bad_maps(counts, match):
    with pytest.raises(InputError, match=match):
        ScrnaPipeline().prepare(counts_raw(counts))


def test_scrna_tensor_form():
    pipeline = ScrnaPipeline()
    vector = np.zeros(len(PBMC_GENES))
    vector[0] = 2
    assert pipeline.prepare(RawInput("scrna", F.TENSOR, vector))["expression"].shape == (
        len(PBMC_GENES),
    )
    with pytest.raises(InputError, match=f"must hold {len(PBMC_GENES)} gene counts"):
        pipeline.prepare(RawInput("scrna", F.TENSOR, np.ones(10)))


def test_scrna_encoder_batch_invariance():
    torch.manual_seed(0)
    pipeline = ScrnaPipeline(embed_dim=32)
    assert pipeline.encoder is None
    pipeline.setup()
    raws = [counts_raw({g: float(i + 1) for g in PBMC_GENES[i::7]}) for i in range(3)]
    pooled = pipeline.encode(raws).pooled
    assert pooled.shape == (3, 32)
    torch.testing.assert_close(pooled[:1], pipeline.encode(raws[:1]).pooled, atol=1e-4, rtol=0)


# --- text ---


def text_raw(text):
    return RawInput("text", F.TEXT, text)


@pytest.mark.parametrize(
    ("text", "match"),
    [("", "empty"), ("  \n\t ", "empty"), ("a\x00b", "control"), ("x" * 21, "21 characters")],
)
def test_text_decode_rejects(text, match):
    with pytest.raises(InputError, match=f"^text: .*{match}"):
        TextPipeline({"max_chars": 20}).decode(text_raw(text))


def test_text_unsupported_form():
    with pytest.raises(InputError, match=r"^text: input form edf is not accepted"):
        TextPipeline().prepare(RawInput("text", F.EDF, b"0"))


def test_text_features_and_encoder():
    pipeline = TextPipeline({"max_tokens": 16}, embed_dim=32)
    pipeline.setup()
    sentences = [
        "The patient has chest pain and shortness of breath.",
        "Patient reports dyspnea with chest pain.",
        "The stock market fell sharply today.",
    ]
    items = [pipeline.prepare(text_raw(s)) for s in sentences]
    assert all(len(it["input_ids"]) <= 16 for it in items)
    batch = pipeline.collate(items)
    features = pipeline.features(batch)["features"]
    assert features.shape == (3, 384)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    similarity = features @ features.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2
    out = pipeline.encode([text_raw(s) for s in sentences])
    assert out.pooled.shape == (3, 32)
    for i, sentence in enumerate(sentences):  # the shorter ones were padded in the batch
        alone = pipeline.encode([text_raw(sentence)]).pooled
        torch.testing.assert_close(out.pooled[i : i + 1], alone, atol=1e-4, rtol=0)
    assert not any(k.startswith(("backbone", "embeddings")) for k in pipeline.encoder.state_dict())
