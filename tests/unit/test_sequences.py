"""Sequence decoding (raw / FASTA) and the genomics and protein encoders."""

import pytest
import torch

from multimed.models.catalog import InputForm
from multimed.models.codecs.sequence import parse_sequence, write_fasta
from multimed.models.errors import InputError
from multimed.models.inputs import RawInput
from multimed.models.modalities.genomics import GenomicsPipeline
from multimed.models.modalities.protein import ProteinPipeline

DNA = "ACGTN"


def test_raw_and_lowercase():
    assert parse_sequence("  acgT n\n", "genomics", DNA) == "ACGTN"


def test_fasta_single_wrapped_round_trip():
    sequence = "ACGT" * 40
    text = write_fasta("chr1:100-260", sequence, line_width=60)
    assert text.splitlines()[1] == sequence[:60]
    assert parse_sequence(text, "genomics", DNA) == sequence
    assert parse_sequence(">x desc\nacg\n  tt\n\nGG\n", "genomics", DNA) == "ACGTTGG"


def test_fasta_multi_record_rejected():
    with pytest.raises(InputError, match="2 records"):
        parse_sequence(">a\nACGT\n>b\nACGT\n", "genomics", DNA)


def test_fasta_header_not_first_rejected():
    with pytest.raises(InputError, match="first line"):
        parse_sequence("ACGT\n>b\nACGT\n", "genomics", DNA)


@pytest.mark.parametrize("text", ["", "   \n", ">only header\n"])
def test_empty_rejected(text):
    with pytest.raises(InputError, match="empty"):
        parse_sequence(text, "genomics", DNA)


def test_bad_letters_named_with_positions():
    with pytest.raises(InputError, match=r"'U' at 3, 'X' at 6") as e:
        parse_sequence(">s\nAC\nUGA X", "genomics", DNA)
    assert e.value.modality == "genomics"


def test_not_text_rejected():
    with pytest.raises(InputError, match="must be text"):
        parse_sequence(b"ACGT", "genomics", DNA)


def raw(modality, text):
    return RawInput(modality, InputForm.SEQUENCE, text)


@pytest.mark.parametrize(
    ("pipeline", "text", "match"),
    [
        (GenomicsPipeline(), "ACGTACG", "length 7 < minimum 8"),
        (GenomicsPipeline({"max_length": 10}), "A" * 11, "length 11 > maximum 10"),
        (ProteinPipeline(), "MKV", "length 3 < minimum 5"),
        (ProteinPipeline(), "MKVLBAG", "'B' at 5"),
    ],
)
def test_pipeline_rejects(pipeline, text, match):
    with pytest.raises(InputError, match=match):
        pipeline.prepare(raw(pipeline.modality, text))


def test_tokens():
    dna = GenomicsPipeline().prepare(raw("genomics", "acgtnacg"))["tokens"]
    assert dna.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    protein = ProteinPipeline().prepare(raw("protein", "ACDYX"))["tokens"]
    assert protein.tolist() == [0, 1, 2, 19, 20]


@pytest.mark.parametrize("cls", [GenomicsPipeline, ProteinPipeline])
def test_unsupported_form_names_modality(cls):
    pipeline = cls()
    with pytest.raises(InputError, match=f"^{pipeline.modality}: input form text"):
        pipeline.prepare(RawInput(pipeline.modality, InputForm.TEXT, "ACGT"))


@pytest.mark.parametrize(
    ("cls", "short", "long"),
    [
        (GenomicsPipeline, "ACGTNACGTA", "GATTACA" * 9),
        (ProteinPipeline, "MKVLAAGX", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"),
    ],
)
def test_encoder_shapes_and_padding_invariance(cls, short, long):
    torch.manual_seed(0)
    pipeline = cls(embed_dim=32)
    assert pipeline.encoder is None  # construction loads nothing
    pipeline.setup()
    alone = pipeline.encode([raw(pipeline.modality, short)])
    both = pipeline.encode([raw(pipeline.modality, short), raw(pipeline.modality, long)])
    assert both.pooled.shape == (2, 32)
    assert both.tokens.shape == (2, len(long), 32)
    assert both.token_mask.sum(1).tolist() == [len(short), len(long)]
    assert not both.token_mask[0, len(short) :].any()
    torch.testing.assert_close(both.pooled[:1], alone.pooled, atol=1e-4, rtol=0)
    torch.testing.assert_close(both.tokens[:1, : len(short)], alone.tokens, atol=1e-4, rtol=0)
    first = pipeline.unbatch(both)[0]
    assert first.tokens.shape == (1, len(short), 32)
