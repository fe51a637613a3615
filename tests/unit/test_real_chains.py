import gzip
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest

from multimed.models.cohort import chains as R
from multimed.models.modalities.protein import ALPHABET


@pytest.fixture(scope="module")
def chains():
    return R.load_real_chains()


def _names(parts) -> list[list[str]]:
    return [[c.name for c in part] for part in parts]


def _shared(a: str, b: str, k: int = 5) -> float:
    """Share of the shorter sequence's k-mers found in the other."""
    words_a, words_b = ({s[i : i + k] for i in range(len(s) - k + 1)} for s in (a, b))
    return len(words_a & words_b) / min(len(words_a), len(words_b))


def _text(chain: R.RealChain) -> str:
    return "".join(R.STRUCTURE[i] for i in chain.labels)


def test_loader_returns_distinct_complete_chains(chains):
    assert len(chains) >= 60
    assert sum(len(c.sequence) for c in chains) >= 9000
    assert [c.name for c in chains] == sorted({c.name for c in chains})  # unique, sorted
    assert "1BD2:D" not in {c.name for c in chains}  # two gaps in its backbone
    for c in chains:
        assert len(c.sequence) >= R.MIN_LENGTH and set(c.sequence) <= set(ALPHABET)
        assert c.labels.dtype == np.int64 and c.labels.shape == (len(c.sequence),)
    # one protein counts once: a homodimer, HLA-A2 in 1BD2 and 3PWP, b2m one residue shorter
    sequences = [c.sequence for c in chains]
    assert not any(a in b for a in sequences for b in sequences if a is not b)
    assert _names([R.load_real_chains()]) == _names([chains])  # cached, deterministic


def test_state_shares_are_those_of_real_proteins(chains):
    labels = np.concatenate([c.labels for c in chains])
    share = dict(zip(R.STRUCTURE, np.bincount(labels, minlength=3) / len(labels), strict=True))
    assert 0.25 < share["H"] < 0.45 and 0.15 < share["E"] < 0.35 and 0.30 < share["C"] < 0.50


def test_matches_the_reference_assignments_shipped_with_the_structures(chains):
    """MDAnalysisTests keeps each DSSP test chain's expected string next to it ('-' is loop)."""
    by_name = {c.name: c for c in chains}
    files = sorted((R.structures_dir() / "dssp").glob("?????.pdb.gz"))
    assert len(files) == 50
    for path in files:
        expected = path.with_suffix(".dssp").read_text().split()[0].replace("-", "C")
        assert _text(by_name[f"{path.name[:4].upper()}:{path.name[4]}"]) == expected, path.name


def _pdb_records(path: Path, chain: str) -> str:
    """3-state string from the file's own HELIX and SHEET records, one letter per CA."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
        lines = f.read().splitlines()
    residues = [
        int(line[22:26])
        for line in lines
        if line.startswith("ATOM") and line[12:17] in (" CA  ", " CA A") and line[21] == chain
    ]
    states = ["C"] * len(residues)
    for line in lines:
        if line.startswith("HELIX") and line[19] == chain:
            first, last, state = int(line[21:25]), int(line[33:37]), "H"
        elif line.startswith("SHEET") and line[21] == chain:
            first, last, state = int(line[22:26]), int(line[33:37]), "E"
        else:
            continue
        states = [state if first <= r <= last else s for r, s in zip(residues, states, strict=True)]
    return "".join(states)


@pytest.mark.parametrize(
    "file, name, state",
    [("1a28.pdb.gz", "1A28:A", "H"), ("mmcif/3KPR.pdb.gz", "3KPR:D", "E")],
    ids=["progesterone-receptor-helices", "tcr-alpha-strands"],
)
def test_agrees_with_the_pdb_entry_s_own_records(chains, file, name, state):
    ours = _text(next(c for c in chains if c.name == name))
    theirs = _pdb_records(R.structures_dir() / file, name[-1])
    same = np.array([a == b for a, b in zip(ours, theirs, strict=True)])
    rich = np.array([b == state for b in theirs])
    assert rich.mean() > 0.3  # a chain that really has this state: all-loop labels would fail
    assert same.mean() > 0.9 and same[rich].mean() > 0.9


def test_split_by_chain_keeps_families_apart(chains):
    train, validation, test = R.split_chains(chains)
    parts = (train, validation, test)
    names = [c.name for part in parts for c in part]
    assert sorted(names) == [c.name for c in chains]  # each chain in exactly one part
    assert 0.15 < len(test) / len(chains) < 0.3 and 0.1 < len(validation) / len(chains) < 0.25
    for i, j in ((0, 1), (0, 2), (1, 2)):
        # no shared sequence, nor a close homologue: unrelated chains share < 2 % of 5-mers
        assert max(_shared(a.sequence, b.sequence) for a in parts[i] for b in parts[j]) < 0.1
    shuffled = random.Random(1).sample(chains, len(chains))
    assert _names(R.split_chains(shuffled)) == _names(parts)
    assert _names(R.split_chains(chains, seed=1)) != _names(parts)


def test_families_join_homologues_only():
    a = "MRIILLGAPGAGKGTQAQFIMEKYGIPQISTGDMLRAAVKSGSELGKQAKDIMDAGKLVTDELVIALVKE"
    mutant = a[:20] + "W" + a[21:40] + "W" + a[41:]
    unrelated = "PQITLWKRPLVTIKIGGQLKEALLDTGADDTVLEEMNLPGRWKPKMIGGIGGFIKVRQYDQILIEI"
    assert R._families([a, mutant, unrelated]) == [0, 0, 2]


def test_window_features_one_hot_with_padding():
    x = R.window_features("ACDW", half=2)
    assert x.shape == (4, 5 * 21) and x.dtype == np.float32
    slots = x.reshape(4, 5, 21)
    assert (slots.sum(-1) == 1).all()  # one symbol per window slot
    outside = ALPHABET.index("X")
    assert slots[0, :2, outside].all() and slots[3, 3:, outside].all()  # beyond the ends
    assert [ALPHABET[k] for k in slots[:, 2].argmax(-1)] == list("ACDW")  # centred
    assert slots[1, 3].argmax() == ALPHABET.index("D")  # one step right of C is D


def test_baseline_beats_the_majority_class(chains):
    train, _, test = R.split_chains(chains)
    labels = np.concatenate([c.labels for c in test])
    majority = np.bincount(labels).max() / len(labels)
    q3 = R.baseline_q3(train, test)
    assert q3 > max(majority + 0.05, 0.5)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"multimed-serve\[train\]"):
        R.structures_dir()
