"""Sequence text (raw or single-record FASTA) <-> validated upper-case sequence string."""

from __future__ import annotations

import itertools

from multimed.models.errors import InputError

_SHOWN = 5  # how many bad letters an error names
# Raw text allowed per letter of max_length, plus a FASTA header. Line wrapping and spacing add
# at most one character per letter (FASTA wraps every 60, GenBank-style groups every 10), and a
# FASTA header (UniProt, NCBI) rarely passes a few hundred characters.
_RAW_PER_LETTER = 2
_MAX_HEADER_CHARS = 10_000


def parse_sequence(
    text: str, modality: str, alphabet: str, *, min_length: int = 1, max_length: int | None = None
) -> str:
    """Raw or single-record FASTA text -> upper-case sequence over `alphabet`.

    Whitespace and line wrapping are ignored; lower case is accepted. Positions in errors are
    1-based in the sequence (header and whitespace not counted). Text too long for `max_length`
    is refused before it is split or scanned.
    """
    if not isinstance(text, str):
        raise InputError(modality, f"sequence must be text, got {type(text).__name__}")
    if max_length is not None and len(text) > _RAW_PER_LETTER * max_length + _MAX_HEADER_CHARS:
        raise InputError(
            modality, f"sequence text has {len(text)} characters; maximum length is {max_length}"
        )
    lines = text.strip().splitlines()
    headers = sum(line.lstrip().startswith(">") for line in lines)
    if headers > 1:
        raise InputError(modality, f"FASTA holds {headers} records; send exactly one")
    if headers == 1:
        if not lines[0].lstrip().startswith(">"):
            raise InputError(modality, "FASTA header ('>') must be the first line")
        lines = lines[1:]
    sequence = "".join("".join(lines).split()).upper()
    if not sequence:
        raise InputError(modality, "sequence is empty")
    if max_length is not None and len(sequence) > max_length:
        raise InputError(modality, f"sequence length {len(sequence)} > maximum {max_length}")
    allowed = set(alphabet)
    outside = ((i, c) for i, c in enumerate(sequence, 1) if c not in allowed)
    bad = list(itertools.islice(outside, _SHOWN))  # the rest are counted, never listed
    if bad:
        more = sum(1 for _ in outside)
        shown = ", ".join(f"{c!r} at {i}" for i, c in bad) + (f" and {more} more" if more else "")
        raise InputError(modality, f"letters outside alphabet {alphabet}: {shown}")
    if len(sequence) < min_length:
        raise InputError(modality, f"sequence length {len(sequence)} < minimum {min_length}")
    return sequence


def write_fasta(record_id: str, sequence: str, line_width: int = 60) -> str:
    """One FASTA record, sequence wrapped at `line_width` letters."""
    body = "\n".join(sequence[i : i + line_width] for i in range(0, len(sequence), line_width))
    return f">{record_id}\n{body}\n"
