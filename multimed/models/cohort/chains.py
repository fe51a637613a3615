"""Real protein chains with DSSP secondary structure, and a windowed logistic-regression baseline,
for protein_structure_prediction beyond the synthetic cohort.

The structures are crystal structures that MDAnalysisTests (MDAnalysis's test data, on PyPI, in
the `train` extra) ships in its `data/` folder:
- `dssp/?????.pdb.gz`: 50 single-chain PDB entries (e.g. `1ahsA.pdb.gz` is 1AHS chain A) that
  MDAnalysis tests its DSSP on;
- every protein chain of the entries in `_ENTRIES` (adenylate kinase 4AKE, HIV protease,
  progesterone receptor, osmoporin, a nine-haem cytochrome c, PTP1B, three MHC-peptide-TCR
  complexes).
Each chain is assigned alone with MDAnalysis's DSSP (its numpy port of PyDSSP, Kabsch & Sander
hydrogen bonds), whose three states already fold H, G, I into helix and E, B into strand.
Result: 64 distinct chains, 9,978 residues; H 32 %, E 27 %, C 41 %. About 2 s cold, then cached.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from multimed.models.catalog import CATALOG
from multimed.models.cohort.packaged import packaged
from multimed.models.modalities.protein import ALPHABET

if TYPE_CHECKING:
    from MDAnalysis.core.groups import ResidueGroup

# MDAnalysis logs on import that netCDF4 (for AMBER files, never read here) is missing.
logging.getLogger("MDAnalysis.coordinates.AMBER").setLevel(logging.ERROR)

STRUCTURE = CATALOG.tasks["protein_structure_prediction"].labels  # ("H", "E", "C")
MIN_LENGTH = 30
# Whole entries (file under data/ -> PDB id), read chain by chain. Left out: adk_closed.pdb
# (1AKE, 4AKE's sequence again) and 1hvr.pdb (HIV protease again, with a chain break).
_ENTRIES = {
    "adk_open.pdb": "4AKE",  # one chain, written without a chain id
    "4E43.pdb": "4E43",
    "1a28.pdb.gz": "1A28",
    "1osm.pdb.gz": "1OSM",
    "19hc.pdb.gz": "19HC",
    "merge/2zmm/protein.pdb": "2ZMM",  # PTP1B
    "mmcif/1BD2.pdb.gz": "1BD2",
    "mmcif/3KPR.pdb.gz": "3KPR",
    "mmcif/3PWP.pdb.gz": "3PWP",
}
# accepted names per backbone atom: force-field files name the C-terminal O OT1 or O1
_BACKBONE = (("N",), ("CA",), ("C",), ("O", "OT1", "O1"))
_PEPTIDE_BOND_A = 2.0  # C(i)-N(i+1) longer than this: residues are missing in between


@dataclass(frozen=True)
class RealChain:
    name: str  # PDB id and chain, e.g. "4AKE:A"
    sequence: str  # over ALPHABET; residues outside the 20 standard ones are "X"
    labels: np.ndarray  # int64 [len(sequence)], indices into STRUCTURE


def structures_dir() -> Path:
    """MDAnalysisTests' data folder."""
    return packaged("MDAnalysisTests", "data", "real protein chains need the structures it ships")


def _files() -> dict[Path, str]:
    data = structures_dir()
    single = {p: p.name[:4].upper() for p in (data / "dssp").glob("?????.pdb.gz")}
    return single | {data / name: pdb_id for name, pdb_id in _ENTRIES.items()}


def _backbone(residues: ResidueGroup) -> tuple[str, np.ndarray] | None:
    """Sequence and N, CA, C, O coordinates [L, 4, 3] of a chain, or None where an atom or a
    residue is missing (DSSP would read the gap as a peptide bond)."""
    from MDAnalysis.lib.util import inverse_aa_codes

    letters, coords = [], []
    for residue in residues:
        names = list(residue.atoms.names)
        atoms = []
        for wanted in _BACKBONE:
            found = [i for i, n in enumerate(names) if n in wanted]  # first altloc wins
            if not found:
                return None
            atoms.append(residue.atoms.positions[found[0]])
        letters.append(inverse_aa_codes.get(residue.resname, "X"))
        coords.append(atoms)
    xyz = np.asarray(coords, np.float64)
    if np.linalg.norm(xyz[1:, 0] - xyz[:-1, 2], axis=1).max(initial=0) > _PEPTIDE_BOND_A:
        return None
    return "".join(letters), xyz


def _dssp(sequence: str, xyz: np.ndarray) -> np.ndarray:
    from MDAnalysis.analysis.dssp import assign

    # proline's N carries no hydrogen to donate, as MDAnalysis's own DSSP class masks it
    onehot = assign(xyz, donor_mask=np.array([a != "P" for a in sequence]))
    to_ours = np.array([STRUCTURE.index(s) for s in "CHE"])  # assign's order: loop, helix, strand
    return to_ours[onehot.argmax(-1)].astype(np.int64)


def _read(path: Path, pdb_id: str) -> list[RealChain]:
    import warnings

    import MDAnalysis

    with warnings.catch_warnings():  # PDB files lack the elements and masses MDAnalysis guesses
        warnings.simplefilter("ignore")
        protein = MDAnalysis.Universe(str(path)).select_atoms("protein")
    chains = []
    for segment in protein.segments:
        residues = segment.residues.intersection(protein.residues)
        chain_id = residues.atoms.chainIDs[0].strip() or "A"  # adk_open.pdb is 4AKE's chain A
        backbone = _backbone(residues) if len(residues) >= MIN_LENGTH else None
        if backbone is not None:
            sequence, xyz = backbone
            chains.append(RealChain(f"{pdb_id}:{chain_id}", sequence, _dssp(sequence, xyz)))
    return chains


@functools.cache
def _chains() -> tuple[RealChain, ...]:
    found = [chain for path, pdb_id in _files().items() for chain in _read(path, pdb_id)]
    # One chain per protein: a copy that resolves fewer residues (a substring) folds into the
    # longest one, so a homodimer or the same protein in two files counts once.
    kept: list[RealChain] = []
    for chain in sorted(found, key=lambda c: (-len(c.sequence), c.name)):
        if not any(chain.sequence in k.sequence for k in kept):
            chain.labels.setflags(write=False)  # shared by every caller through the cache
            kept.append(chain)
    return tuple(sorted(kept, key=lambda c: c.name))


def load_real_chains() -> list[RealChain]:
    """The distinct real chains of at least MIN_LENGTH residues with complete backbones, by name."""
    return list(_chains())


# --- a split that keeps homologues together ---


def _families(sequences: list[str], k: int = 5, shared: float = 0.2) -> list[int]:
    """Family id per sequence: sequences sharing at least `shared` of the shorter one's k-mers
    are joined (single linkage). Unrelated proteins share almost no 5-mers (20^5 words), while a
    mutant, a paralogue or a shared constant domain shares many."""
    words = [{s[i : i + k] for i in range(len(s) - k + 1)} for s in sequences]
    family = list(range(len(sequences)))

    def root(i: int) -> int:
        while family[i] != i:
            i = family[i]
        return i

    for i in range(len(words)):
        for j in range(i):
            if len(words[i] & words[j]) >= shared * min(len(words[i]), len(words[j])):
                family[root(i)] = root(j)
    return [root(i) for i in range(len(sequences))]


def split_chains(
    chains: list[RealChain],
    test_fraction: float = 0.2,
    validation_fraction: float = 0.15,
    seed: int = 0,
) -> tuple[list[RealChain], list[RealChain], list[RealChain]]:
    """(train, validation, test) by chain, whole families at a time, so no protein or close
    homologue is on both sides. Fractions are of chains; the same chains and seed give the same
    split in any input order."""
    chains = sorted(chains, key=lambda c: c.name)
    groups: dict[int, list[RealChain]] = {}
    for chain, family in zip(chains, _families([c.sequence for c in chains]), strict=True):
        groups.setdefault(family, []).append(chain)
    test: list[RealChain] = []
    validation: list[RealChain] = []
    train: list[RealChain] = []
    for family in np.random.default_rng(seed).permutation(sorted(groups)):
        if len(test) < test_fraction * len(chains):
            test += groups[family]
        elif len(validation) < validation_fraction * len(chains):
            validation += groups[family]
        else:
            train += groups[family]
    return train, validation, test


# --- the baseline ---

_INDEX = {a: i for i, a in enumerate(ALPHABET)}
_OUTSIDE = _INDEX["X"]  # beyond either end of the chain reads as an unknown residue


def window_features(sequence: str, half: int = 7) -> np.ndarray:
    """One-hot residues in a window of 2 * half + 1 centred on each residue: float32
    [L, (2 * half + 1) * 21], 21 = 20 amino acids + unknown or outside the chain."""
    tokens = [_INDEX.get(a, _OUTSIDE) for a in sequence]
    padded = np.array([_OUTSIDE] * half + tokens + [_OUTSIDE] * half, np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)  # [L, 2*half+1]
    return np.eye(len(ALPHABET), dtype=np.float32)[windows].reshape(len(sequence), -1)


def baseline_q3(train: list[RealChain], test: list[RealChain], half: int = 7) -> float:
    """Per-residue accuracy (Q3) on `test` of a logistic regression on window_features, fitted
    on `train`: the floor a learned protein encoder should clear."""
    from sklearn.linear_model import LogisticRegression

    def stack(chains: list[RealChain]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([window_features(c.sequence, half) for c in chains])
        return x, np.concatenate([c.labels for c in chains])

    model = LogisticRegression(max_iter=1000).fit(*stack(train))
    x, y = stack(test)
    return float((model.predict(x) == y).mean())
