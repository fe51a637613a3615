"""Sequence text (raw or single-record FASTA) <-> validated upper-case sequence string."""

from __future__ import annotations

from multimed.models.errors import InputError

_SHOWN = 5  # how many bad letters an error names


def parse_sequence(
    text: str, modality: str, alphabet: str, *, min_length: int = 1, max_length: int | None = None
) -> str:
    """Raw or single-record FASTA text -> upper-case sequence over `alphabet`.

    Whitespace and line wrapping are ignored; lower case is accepted. Positions in errors are
    1-based in the sequence (header and whitespace not counted).
    """
    if not isinstance(text, str):
        raise InputError(modality, f"sequence must be text, got {type(text).__name__}")
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
    allowed = set(alphabet)
    bad = [(i, c) for i, c in enumerate(sequence, 1) if c not in allowed]
    if bad:
        shown = ", ".join(f"{c!r} at {i}" for i, c in bad[:_SHOWN])
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise InputError(modality, f"letters outside alphabet {alphabet}: {shown}{more}")
    if len(sequence) < min_length:
        raise InputError(modality, f"sequence length {len(sequence)} < minimum {min_length}")
    if max_length is not None and len(sequence) > max_length:
        raise InputError(modality, f"sequence length {len(sequence)} > maximum {max_length}")
    return sequence


def write_fasta(record_id: str, sequence: str, line_width: int = 60) -> str:
    """One FASTA record, sequence wrapped at `line_width` letters."""
    body = "\n".join(sequence[i : i + line_width] for i in range(0, len(sequence), line_width))
    return f">{record_id}\n{body}\n"
