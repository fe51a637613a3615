"""The synthetic cohort: seeded patients whose ten modalities are rendered, in decoded form, from
one latent state, with labels for all eleven tasks.

Planted signal (see each renderer): X-ray, CT and MRI each show the disease pattern only with
probability P_SHOW, so fusing them beats any one; the VQA answer needs the question (its type)
and the image (the lesion); expression depends on DNA motifs and on the cell type seen in scRNA;
protein structure is drawn first and the sequence from it. Cell-type expression comes from the
real PBMC data bundled with scanpy (pbmc68k_reduced), read with anndata: from its training cells
only (`pbmc_split`), so that its held-out cells stay unseen.

No task is perfect by construction: tumour types and cell types are annotated wrongly at times
(P_LABEL), tumour locations overlap, and a synthetic cell is drawn around one real cell's profile,
at a real cell's depth. The latent state keeps what each renderer drew (`ceilings.py` reads it to
give the accuracy the generator allows).

Image layout (64x64, shared by X-ray, CT and MRI so one map serves all): rows 0-13 bone-age bars
(X-ray), rows 14-47 disease pattern (centre columns) and VQA ring (left or right third), rows
48-63 radiographic-finding marks (X-ray). MRI keeps disease (slices 0-7) and tumour (8-15) apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from multimed.models.catalog import (
    CATALOG,
    CELL_TYPES,
    EXPRESSION_PANEL,
    IMAGING,
    PBMC_GENES,
    VQA_ANSWERS,
)
from multimed.models.codecs.types import EEGRecord, GeneCounts
from multimed.models.cohort.packaged import packaged
from multimed.models.outputs import output_of

SIDE, DEPTH = 64, 16  # image side, volume slices
EEG_CHANNELS = (
    "Fz", "FC3", "FC1", "FCz", "FC2", "FC4", "C5", "C3", "C1", "Cz", "C2",
    "C4", "C6", "CP3", "CP1", "CPz", "CP2", "CP4", "P1", "Pz", "P2", "POz",
)  # fmt: skip
EEG_RATE_HZ, EEG_SAMPLES = 256.0, 1024  # 4 s
DNA_LENGTH = 200
# One 6-mer per EXPRESSION_PANEL gene (real TF-site-like words: TATA, E-box, SP1, AP-1, GATA...).
MOTIFS = ("TATAAA", "CACGTG", "GGGCGG", "TGACTC", "GATAAG", "CCAATC", "AGGTCA", "TTGCGC")
P_SHOW = 0.6  # an imaging modality shows the true disease pattern, else a random class's
P_SYMPTOM = 0.5  # the note names the true disease's symptom, else a random class's
P_FINDING = 0.25
BAR_NOISE = 0.7  # bone-age bar length's sd (pixels; 0.5 px a year)
CONTEXT_WEIGHT = 0.6  # cell type's share of expression; DNA motifs add 0 or 1 per panel gene
EXPRESSION_NOISE = 0.3  # the sd of what neither DNA nor cell type explains
P_LABEL = 0.9  # a tumour's or a cell's annotation names its true type, else a random type
P_OCT_VISIBLE = 0.9  # a retinal lesion shows on the OCT, else the scan looks normal
# The real cells' split: fixed, since the synthetic cells are drawn from the training part.
PBMC_TEST_FRACTION, PBMC_VALIDATION_FRACTION = 0.2, 0.15
VQA_MODALITIES = ("xray", "ct", "mri", "pathology")

_LABELS = {tid: spec.labels for tid, spec in CATALOG.tasks.items()}
DISEASES = _LABELS["disease_classification"]
TUMOURS = _LABELS["brain_tumor_classification"]
FINDINGS = _LABELS["radiographic_findings_classification"]
AGE_BANDS = _LABELS["bone_age_classification"]
RETINA = _LABELS["diabetic_retinopathy_classification"]  # OCT2017's: normal, drusen, DME, CNV
MOTOR = _LABELS["motor_imagery_classification"]
STRUCTURE = _LABELS["protein_structure_prediction"]  # ("H", "E", "C")
assert len(MOTIFS) == len(EXPRESSION_PANEL)

_SYMPTOMS = {  # keyed by catalog name, so a renamed label fails here rather than silently
    "normal": ("a routine check-up with no acute complaints", "a pre-operative assessment"),
    "infection": ("fever and productive cough", "chills, malaise and purulent sputum"),
    "neoplasm": ("unintentional weight loss and night sweats", "a slowly enlarging painless mass"),
    "vascular": ("sudden chest pain and dyspnoea", "acute unilateral leg swelling"),
}
_QUESTIONS = (  # VQA question types: presence, side, size
    ("Is there a lesion in this {m}?", "Is any abnormality visible on the {m}?",
     "Does this {m} show a lesion?"),
    ("Which side is the lesion on?", "Is the lesion on the left or the right of the {m}?",
     "On which side of the image is the abnormality?"),
    ("How big is the lesion?", "Is the lesion small or large?",
     "What is the size of the abnormality on this {m}?"),
)  # fmt: skip
_MODALITY_WORDS = {"xray": "radiograph", "ct": "CT scan", "mri": "MRI", "pathology": "slide"}
assert set(_SYMPTOMS) == set(DISEASES)
assert {"yes", "no", "left", "right", "small", "large"} == set(VQA_ANSWERS)


@dataclass(frozen=True)
class Patient:
    id: str  # e.g. "P000123"
    inputs: dict[str, object]  # decoded objects by modality ("text" -> the note)
    question: str  # VQA question text
    vqa_modality: str  # which imaging modality the VQA question is about
    # task id -> int label index | list[int] multi-hot | float32 regression | int64 per-residue
    labels: dict[str, object]
    latent: dict[str, object] = field(default_factory=dict)  # hidden state, for tests/analysis


# --- real PBMC data ---


def pbmc68k_path() -> Path:
    """scanpy's bundled pbmc68k_reduced file."""
    return packaged(
        "scanpy",
        "datasets/10x_pbmc68k_reduced.h5ad",
        "the synthetic cohort needs the real pbmc68k_reduced cells it ships",
    )


@functools.cache
def _pbmc() -> tuple[np.ndarray, np.ndarray]:
    """Real pbmc68k_reduced cells: pseudo-counts [700, 765] (PBMC_GENES order), label indices."""
    import warnings

    import anndata

    path = pbmc68k_path()
    with warnings.catch_warnings():  # the bundled file predates anndata's current layout
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(path)
    raw = adata.raw.to_adata()
    if tuple(raw.var_names) != PBMC_GENES:
        raise ValueError(f"{path}: genes differ from catalog.PBMC_GENES")
    x = raw.X.toarray() if hasattr(raw.X, "toarray") else np.asarray(raw.X)
    counts = np.round(np.expm1(x)).astype(np.float32)
    index = {name: i for i, name in enumerate(CELL_TYPES)}
    labels = np.array([index[str(t)] for t in adata.obs["bulk_labels"]], np.int64)
    return counts, labels


def load_pbmc68k() -> tuple[np.ndarray, np.ndarray]:
    """The 700 real cells as pseudo-counts float32 [700, 765] and CELL_TYPES indices int64."""
    counts, labels = _pbmc()
    return counts.copy(), labels.copy()


@functools.cache
def pbmc_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the real cells for training, validation and test. Fixed (not the training
    seed's): the generator draws synthetic cells from the training cells alone."""
    n = len(_pbmc()[1])
    order = np.random.default_rng(0).permutation(n)
    n_test, n_val = round(n * PBMC_TEST_FRACTION), round(n * PBMC_VALIDATION_FRACTION)
    return (
        np.sort(order[n_test + n_val :]),
        np.sort(order[n_test : n_test + n_val]),
        np.sort(order[:n_test]),
    )


@dataclass(frozen=True)
class CellModel:
    """What synthetic cells are drawn from, from the real training cells only."""

    profiles: list[np.ndarray]  # per cell type: its training cells' normalised profiles [n_k, G]
    means: np.ndarray  # [10, G] each type's normalised mean profile
    depths: np.ndarray  # the training cells' total counts (sequencing depth)
    context: np.ndarray  # [10, 8] z-scored log panel expression per type


@functools.cache
def _cell_model() -> CellModel:
    counts, labels = _pbmc()
    train = pbmc_split()[0]
    counts, labels = counts[train], labels[train]
    by_type = [counts[labels == k] for k in range(len(CELL_TYPES))]
    profiles = [cells / cells.sum(1, keepdims=True) for cells in by_type]
    means = np.stack([cells.mean(0) for cells in by_type])
    panel = np.log1p(means[:, [PBMC_GENES.index(g) for g in EXPRESSION_PANEL]])
    context = (panel - panel.mean(0)) / panel.std(0)
    return CellModel(
        profiles, means / means.sum(1, keepdims=True), counts.sum(1), context.astype(np.float32)
    )


# --- image primitives (float32, 64x64 unless noted) ---

_AX = np.arange(SIDE, dtype=np.float32)
_Y, _X = np.meshgrid(_AX, _AX, indexing="ij")
_R = np.hypot(_Y - 31.5, _X - 31.5)
_BODY = np.clip(31.0 - _R, 0, 1)  # soft disc filling the field: body / head


def _interp(n_out: int, n_in: int) -> np.ndarray:
    """Linear-interpolation matrix [n_out, n_in]: upsamples coarse noise into smooth fields."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(pos.astype(int), n_in - 2)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1 - (pos - lo)
    m[np.arange(n_out), lo + 1] = pos - lo
    return m


_UP, _UP_Z = _interp(SIDE, 8), _interp(DEPTH, 4)


def _smooth(rng, depth: int = 0) -> np.ndarray:
    """Smooth ~unit-sd noise (anatomy-like variation): [64, 64], or [16, 64, 64] if depth."""
    if not depth:
        return _UP @ rng.standard_normal((8, 8), dtype=np.float32) @ _UP.T
    coarse = _UP @ rng.standard_normal((4, 8, 8), dtype=np.float32) @ _UP.T
    return np.tensordot(_UP_Z, coarse, axes=1)


def _noise(rng, shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)  # float32: volumes dominate the cost


def _g1(c, s) -> np.ndarray:
    """Gaussian profiles along one axis: c, s scalars or [k] -> [k, 64]."""
    c, s = np.atleast_1d(c)[:, None], np.atleast_1d(s)[:, None]
    return np.exp(-0.5 * ((_AX - c) / s) ** 2).astype(np.float32)


def _blobs(cy, cx, sy, sx=None, amp=1.0) -> np.ndarray:
    """Sum of axis-aligned Gaussian blobs, separable so k blobs cost two small matmuls."""
    gy = _g1(cy, sy) * np.asarray(amp, np.float32).reshape(-1, 1)
    return gy.T @ _g1(cx, sy if sx is None else sx)


def _ring(cy, cx, r) -> np.ndarray:
    """The VQA lesion: a thin annulus, a shape no other pattern uses."""
    return np.exp(-(((np.hypot(_Y - cy, _X - cx) - r) / 0.9) ** 2))


def _disease_map(name: str, rng) -> np.ndarray:
    """Unit-peak disease pattern, by class location and shape, jittered +-2 px."""
    dy, dx = rng.uniform(-2, 2, 2)
    if name == "infection":  # diffuse patch, upper centre
        return 0.7 * _blobs(24 + dy, 32 + dx, 5.0)
    if name == "neoplasm":  # compact bright mass, lower centre-left
        return _blobs(38 + dy, 27 + dx, 2.2)
    if name == "vascular":  # vertical streak, centre-right
        return _blobs(30 + dy, 38 + dx, 9.0, 1.2)
    return np.zeros((SIDE, SIDE), np.float32)  # normal


def _vqa_lesion(z: dict) -> np.ndarray:
    les = z["vqa_lesion"]
    if not les["present"]:
        return np.zeros((SIDE, SIDE), np.float32)
    return _ring(les["y"], les["x"], les["radius"])


def _slab(lo: int, hi: int) -> np.ndarray:
    """Depth weights [16, 1, 1]: a smooth bump over slices lo..hi."""
    z = np.arange(DEPTH, dtype=np.float32)
    return np.exp(-0.5 * ((z - (lo + hi) / 2) / ((hi - lo) / 3)) ** 2)[:, None, None]


# --- the latent patient ---


def _latent(rng) -> dict:
    n_dis = len(DISEASES)
    disease = int(rng.integers(n_dis))
    qtype = int(rng.integers(3))
    large, right = bool(rng.integers(2)), bool(rng.integers(2))
    return {
        "disease": disease,
        # which class's pattern each imaging modality shows (the fusion signal)
        "disease_shown": {
            m: disease if rng.random() < P_SHOW else int(rng.integers(n_dis)) for m in IMAGING
        },
        "symptom": disease if rng.random() < P_SYMPTOM else int(rng.integers(n_dis)),
        "tumour": (tumour := int(rng.integers(len(TUMOURS)))),
        "malignant": (malignant := int(rng.integers(2))),
        # the tile looks like its class 90% of the time: caps breast-cancer accuracy near 0.9
        "malignant_shown": malignant if rng.random() < 0.9 else 1 - malignant,
        "findings": [int(v) for v in rng.random(len(FINDINGS)) < P_FINDING],
        "age_years": float(rng.uniform(0, 5 * len(AGE_BANDS))),
        "retina": (retina := int(rng.integers(len(RETINA)))),
        "motor": int(rng.integers(len(MOTOR))),
        "cell_type": (cell := int(rng.integers(len(CELL_TYPES)))),  # uniform: every class present
        "motifs": [int(v) for v in rng.random(len(MOTIFS)) < 0.5],
        "vqa_modality": VQA_MODALITIES[int(rng.integers(len(VQA_MODALITIES)))],
        "question_type": qtype,
        "vqa_lesion": {  # present for sure when the question asks its side or size
            "present": qtype != 0 or bool(rng.random() < 0.5),
            "side": "right" if right else "left",  # image left/right
            "large": large,
            "y": float(rng.uniform(24, 40)),
            "x": float((50.0 if right else 14.0) + rng.uniform(-2, 2)),
            "radius": float((7.0 if large else 3.0) + rng.uniform(-0.4, 0.4)),
        },
        # label noise: what the annotation says
        "tumour_label": tumour if rng.random() < P_LABEL else int(rng.integers(len(TUMOURS))),
        "cell_label": cell if rng.random() < P_LABEL else int(rng.integers(len(CELL_TYPES))),
        "oct_visible": retina == 0 or bool(rng.random() < P_OCT_VISIBLE),
    }


# --- renderers, one per modality: (rng, latent) -> decoded object ---


def _note(rng, z: dict) -> str:
    symptom = rng.choice(_SYMPTOMS[DISEASES[z["symptom"]]])
    sex = rng.choice(("Male", "Female"))
    span = f"{int(rng.integers(2, 10))} {rng.choice(('days', 'weeks'))}"
    history = rng.choice(
        ("No known allergies.", "History of hypertension.", "Non-smoker.",
         "Type 2 diabetes on metformin.", "No relevant past history.")
    )  # fmt: skip
    return f"{sex} patient presenting with {symptom} for {span}. {history}"


def _question(rng, z: dict) -> str:
    template = rng.choice(_QUESTIONS[z["question_type"]])
    return template.format(m=_MODALITY_WORDS[z["vqa_modality"]])


def _xray(rng, z: dict) -> np.ndarray:
    img = 0.12 + 0.2 * _BODY + 0.05 * _smooth(rng)
    # bone age: five vertical bars from row 2, length growing with age (+noise)
    z["bar_length"] = length = 3 + 0.5 * z["age_years"] + rng.normal(0, BAR_NOISE)
    rows = np.clip(length + 2 - _AX, 0, 1) * (_AX >= 2)
    img += 0.45 * np.outer(rows, _g1(np.arange(8, 64, 12), 1.3).sum(0))
    shown = DISEASES[z["disease_shown"]["xray"]]
    img += 0.5 * rng.uniform(0.7, 1.3) * _disease_map(shown, rng)
    # each finding: a dot in its own slot on row 56; absent slots sometimes hold a faint one
    on = np.array(z["findings"], bool)
    amp = np.where(on, rng.uniform(0.12, 0.45, on.size), rng.uniform(0.03, 0.18, on.size))
    amp *= on | (rng.random(on.size) < 0.3)
    z["finding_amplitudes"] = amp
    jy, jx = rng.uniform(-2.5, 2.5, (2, on.size))
    img += _blobs(56 + jy, 8 + 12 * np.arange(on.size) + jx, 1.5, amp=amp)
    img += 0.35 * _vqa_lesion(z) + rng.normal(0, 0.04, img.shape)
    return np.clip(img, 0, 1, dtype=np.float32)[None]


def _ct(rng, z: dict) -> np.ndarray:
    # Hounsfield units: air outside, soft tissue ~35, a bright spine; signal within [-160, 240].
    tissue = 35 + 12 * _smooth(rng, DEPTH) + 8 * _noise(rng, (DEPTH, SIDE, SIDE))
    hu = -1000 + _BODY * (1000 + tissue) + 400 * _blobs(55, 31.5, 3.0)
    shown = DISEASES[z["disease_shown"]["ct"]]
    hu += 160 * rng.uniform(0.7, 1.3) * _disease_map(shown, rng) * _slab(2, 13)
    hu[5:11] += 150 * _vqa_lesion(z)
    return hu.astype(np.float32)


def _tumour_map(name: str, rng) -> np.ndarray:
    """Tumour type by radial position: glioma inner irregular, meningioma at the rim,
    pituitary small midline-low; distinct from the disease patterns (other slices)."""
    # Their ranges overlap: a deep meningioma sits where a peripheral glioma can, and a glioma
    # near the midline low where the pituitary is.
    if name == "glioma":
        r, a = rng.uniform(0, 19), rng.uniform(0, 2 * np.pi)
        cy, cx = 31.5 + r * np.array([np.sin(a), np.cos(a)])[:, None] + rng.normal(0, 2, (2, 3))
        return _blobs(cy, cx, rng.uniform(1.5, 3.5, 3), rng.uniform(1.5, 3.5, 3), amp=0.8)
    if name == "meningioma":
        r, a = rng.uniform(16, 25), rng.uniform(0, 2 * np.pi)
        return _blobs(31.5 + r * np.sin(a), 31.5 + r * np.cos(a), rng.uniform(2.0, 4.0))
    if name == "pituitary":
        return _blobs(45 + rng.normal(0, 2.5), 31.5 + rng.normal(0, 2.5), rng.uniform(1.6, 3.0))
    return np.zeros((SIDE, SIDE), np.float32)  # no_tumor


def _mri(rng, z: dict) -> np.ndarray:
    skull = np.exp(-(((_R - 29.5) / 1.2) ** 2))
    head = np.clip(28.0 - _R, 0, 1) * (380 + 50 * _smooth(rng, DEPTH))
    vol = head + 650 * skull + 15 * np.abs(_noise(rng, (DEPTH, SIDE, SIDE)))  # Rician-like floor
    shown = DISEASES[z["disease_shown"]["mri"]]
    vol[:8] += 300 * rng.uniform(0.7, 1.3) * _disease_map(shown, rng) * _slab(0, 7)[:8]
    tumour = _tumour_map(TUMOURS[z["tumour"]], rng)
    vol[8:] += 350 * rng.uniform(0.3, 1.2) * tumour * _slab(8, 15)[8:]
    vol[4:12] += 320 * _vqa_lesion(z)
    return np.clip(vol, 0, 1000, dtype=np.float32)


def _oct(rng, z: dict) -> np.ndarray:
    """A retinal B-scan: a curved layered band (the retina) over a dark vitreous, with OCT2017's
    lesions: drusen are bumps at the band's floor (the RPE), DME thickens the band and opens dark
    cysts in it, CNV is a bright irregular mass under it with dark fluid above. One scan in ten
    of a diseased eye shows nothing (P_OCT_VISIBLE), and lesion sizes vary."""
    top = 18 + 4 * np.sin(_AX / 64 * 2.5 + rng.uniform(0, np.pi)) + _UP @ rng.normal(0, 1, 8)
    kind = RETINA[z["retina"]] if z["oct_visible"] else "normal"
    thick = 22 + rng.normal(0, 1.0) + (rng.uniform(4, 9) if kind == "dme" else 0)
    rel = _Y - top[None, :]
    band = (rel >= 0) & (rel <= thick)
    img = np.where(band, 0.4 + 0.15 * np.cos(rel * 2 * np.pi / 8), 0.05)
    floor = top + thick  # the RPE, per column
    if kind == "drusen":
        n = int(rng.integers(2, 7))
        x = rng.uniform(6, 58, n)
        img = img + _blobs(floor[x.astype(int)] - 1.0, x, rng.uniform(1.2, 2.2, n), amp=0.45)
    elif kind == "dme":
        n = int(rng.integers(2, 6))
        x = rng.uniform(14, 50, n)
        y = top[x.astype(int)] + rng.uniform(0.3, 0.7, n) * thick
        img = img - _blobs(y, x, rng.uniform(1.3, 2.6, n), amp=0.35)
    elif kind == "cnv":
        x = rng.uniform(20, 44)
        y = floor[int(x)] + 1.5
        img = img + _blobs(y + rng.normal(0, 1, 3), x + rng.normal(0, 3, 3), 2.0, 3.5, amp=0.5)
        img = img - _blobs(y - 5, x, 2.5, 5.0, amp=0.3)
    img = img * rng.gamma(16, 1 / 16, img.shape) + rng.normal(0, 0.02, img.shape)  # speckle
    return np.clip(img, 0, 1, dtype=np.float32)[None]


_EOSIN = np.array([0.93, 0.70, 0.82], np.float32)[:, None, None]
_HEMATOXYLIN = np.array([0.33, 0.18, 0.52], np.float32)[:, None, None]


def _pathology(rng, z: dict) -> np.ndarray:
    # malignant: more, larger, elongated, darker nuclei; ranges overlap so it stays noisy
    mal = z["malignant_shown"]
    n = max(5, round(rng.normal(34 if mal else 26, 7)))
    size = rng.uniform(2.2, 3.6, n) if mal else rng.uniform(1.6, 2.8, n)
    elong = rng.uniform(1.0, 1.8 if mal else 1.25, n)
    flip = rng.random(n) < 0.5
    sy, sx = np.where(flip, size * elong, size), np.where(flip, size, size * elong)
    dark = rng.uniform(0.8, 1.0, n) if mal else rng.uniform(0.6, 0.9, n)
    cy, cx = rng.uniform(2, 62, (2, n))
    nuclei = np.clip(1.5 * _blobs(cy, cx, sy / 1.6, sx / 1.6, amp=dark), 0, 1)
    stroma = _EOSIN * (1 + 0.06 * _smooth(rng))
    img = stroma * (1 - nuclei) + _HEMATOXYLIN * nuclei
    img = img * (1 - 0.5 * _vqa_lesion(z)) + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1, dtype=np.float32)


_CH = {c: i for i, c in enumerate(EEG_CHANNELS)}
_ERD = {  # motor class -> (suppressed centre, neighbours): contralateral mu desynchronisation
    "left_hand": ("C4", ("C2", "C6", "FC4", "CP4")),
    "right_hand": ("C3", ("C1", "C5", "FC3", "CP3")),
    "feet": ("Cz", ("C1", "C2", "FCz", "CPz")),
}
_FRONTAL = [_CH[c] for c in ("Fz", "FC3", "FC1", "FCz", "FC2", "FC4")]
_FREQS = np.fft.rfftfreq(EEG_SAMPLES, 1 / EEG_RATE_HZ)
_PINK = 1 / np.sqrt(np.maximum(_FREQS, 1.0))
_T = np.arange(EEG_SAMPLES) / EEG_RATE_HZ
assert set(_ERD) | {"tongue"} == set(MOTOR)


def _pink(rng, rows: int) -> np.ndarray:
    spec = rng.standard_normal((rows, _FREQS.size)) + 1j * rng.standard_normal((rows, _FREQS.size))
    x = np.fft.irfft(spec * _PINK, n=EEG_SAMPLES)
    return x / x.std(1, keepdims=True)


def _eeg(rng, z: dict):
    n = len(EEG_CHANNELS)
    gain = rng.lognormal(0, 0.2, (n, 1))
    data = 9 * gain * _pink(rng, n) + 4 * _pink(rng, 1)  # own + shared (volume-conducted) noise
    weight = np.ones(n)
    motor = MOTOR[z["motor"]]
    if motor in _ERD:
        centre, near = _ERD[motor]
        depth = rng.uniform(0.15, 0.6)  # how strongly this trial desynchronises
        weight[[_CH[c] for c in near]] = (1 + depth) / 2
        weight[_CH[centre]] = depth
    envelope = 1 + 0.3 * np.sin(2 * np.pi * 0.4 * _T + rng.uniform(0, 2 * np.pi))
    mu = np.sin(2 * np.pi * rng.uniform(9, 11) * _T + rng.uniform(0, 2 * np.pi, (n, 1)))
    data += 6 * rng.lognormal(0, 0.25) * weight[:, None] * envelope * mu
    if motor == "tongue":  # frontal 20 Hz beta burst, 0.5-3.5 s
        burst = np.sin(np.pi * np.clip((_T - 0.5) / 3.0, 0, 1)) ** 2
        beta = np.sin(2 * np.pi * rng.uniform(18, 22) * _T + rng.uniform(0, 2 * np.pi))
        data[_FRONTAL] += 5 * rng.lognormal(0, 0.25) * burst * beta
    return EEGRecord(data.astype(np.float32), EEG_CHANNELS, EEG_RATE_HZ)


def _dna(rng, z: dict) -> str:
    seq = np.array(list("ACGT"))[rng.integers(4, size=DNA_LENGTH)]
    window = DNA_LENGTH // len(MOTIFS)  # each motif gets its own window, so none overlap
    slots = rng.permutation(len(MOTIFS))
    for k in np.flatnonzero(z["motifs"]):
        start = slots[k] * window + int(rng.integers(window - 6 + 1))
        seq[start : start + 6] = list(MOTIFS[k])
    return "".join(seq)


def _scrna(rng, z: dict):
    """A cell around one real training cell of its type (half its own profile, half its type's
    mean), sequenced at a real cell's depth: cells vary within a type and types overlap as the
    real ones do."""
    cells = _cell_model()
    own = cells.profiles[z["cell_type"]]
    profile = 0.5 * own[rng.integers(len(own))] + 0.5 * cells.means[z["cell_type"]]
    depth = cells.depths[rng.integers(len(cells.depths))]
    rate = depth * profile * rng.gamma(4, 1 / 4, len(PBMC_GENES))
    return GeneCounts(rng.poisson(rate).astype(np.float32))


_AMINO = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
_SEGMENT = {"H": (6, 14), "E": (4, 8), "C": (2, 6)}  # length range per structure state
_RICH = {"H": "ALEKMQR", "E": "VIYFWT", "C": "GPNDS"}  # propensity-rich residues
_PROPENSITY = {
    s: (w := np.where(np.isin(_AMINO, list(rich)), 6.0, 1.0)) / w.sum() for s, rich in _RICH.items()
}
assert set(_SEGMENT) == set(STRUCTURE)


def _protein(rng, z: dict) -> str:
    """Structure first (alternating segments, kept in z["structure"] as label indices), then
    residues from per-state propensities."""
    length = int(rng.integers(40, 121))
    states, prev = [], None
    while len(states) < length:
        s = rng.choice([s for s in STRUCTURE if s != prev])
        lo, hi = _SEGMENT[s]
        states += [s] * int(rng.integers(lo, hi + 1))
        prev = s
    states = states[:length]
    z["structure"] = labels = np.array([STRUCTURE.index(s) for s in states], np.int64)
    seq = rng.choice(_AMINO, length)  # uniform: the quarter of residues that carry no signal
    for i, s in enumerate(STRUCTURE):
        pick = (labels == i) & (rng.random(length) >= 0.25)
        seq[pick] = rng.choice(_AMINO, int(pick.sum()), p=_PROPENSITY[s])
    return "".join(seq)


# --- the cohort ---

# A random stream per renderer, so changing one renderer leaves the others' draws alone. The
# numbering is part of every seeded cohort: a new stream goes at the end (spawning more streams
# leaves the first ones as they were); the sequence modalities share one, drawn in table order.
_LATENT, _TEXT, _XRAY, _CT, _MRI, _OCT, _PATHOLOGY, _EEG, _SEQUENCE = range(9)
_STREAMS = _SEQUENCE + 1

# modality -> (its stream, its renderer). Renderers run in this order after the latent is drawn.
_RENDERERS: dict[str, tuple[int, Callable[[np.random.Generator, dict], object]]] = {
    "text": (_TEXT, _note),
    "xray": (_XRAY, _xray),
    "ct": (_CT, _ct),
    "mri": (_MRI, _mri),
    "oct": (_OCT, _oct),
    "pathology": (_PATHOLOGY, _pathology),
    "eeg": (_EEG, _eeg),
    "genomics": (_SEQUENCE, _dna),
    "protein": (_SEQUENCE, _protein),
    "scrna": (_SEQUENCE, _scrna),
}
assert set(_RENDERERS) == set(CATALOG.modalities)


def generate_patient(index: int, seed: int = 0) -> Patient:
    """Patient `index` of cohort `seed`: depends on (seed, index) only."""
    streams = [
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(_STREAMS)
    ]
    z = _latent(streams[_LATENT])
    inputs = {m: render(streams[k], z) for m, (k, render) in _RENDERERS.items()}
    z["motifs"] = [int(m in inputs["genomics"]) for m in MOTIFS]  # count chance occurrences too
    expression = expected_expression(z) + streams[_SEQUENCE].normal(0, EXPRESSION_NOISE, 8)
    labels = {
        "disease_classification": z["disease"],
        "brain_tumor_classification": z["tumour_label"],
        "breast_cancer_classification": z["malignant"],
        "radiographic_findings_classification": list(z["findings"]),
        "bone_age_classification": min(int(z["age_years"] // 5), len(AGE_BANDS) - 1),
        "diabetic_retinopathy_classification": z["retina"],
        "motor_imagery_classification": z["motor"],
        "cell_type_classification": z["cell_label"],
        "expression_prediction": expression.astype(np.float32),
        "protein_structure_prediction": z["structure"],
        "medical_vqa": VQA_ANSWERS.index(vqa_answer(z)),
    }
    assert set(labels) == set(CATALOG.tasks)
    return Patient(
        id=f"P{index:06d}",
        inputs=inputs,
        question=_question(streams[_TEXT], z),
        vqa_modality=z["vqa_modality"],
        labels=labels,
        latent=z,
    )


def vqa_answer(z: dict) -> str:
    """The answer the lesion gives to the question asked (presence, side or size)."""
    lesion = z["vqa_lesion"]
    present = "yes" if lesion["present"] else "no"
    return (present, lesion["side"], "large" if lesion["large"] else "small")[z["question_type"]]


def expected_expression(z: dict) -> np.ndarray:
    """The panel's expression that DNA motifs and the cell type explain (the rest is noise)."""
    return np.array(z["motifs"]) + CONTEXT_WEIGHT * _cell_model().context[z["cell_type"]]


def generate_cohort(n: int, seed: int = 0) -> list[Patient]:
    """n patients; patient i is the same whatever n."""
    return [generate_patient(i, seed) for i in range(n)]


def task_inputs(patient: Patient, task_id: str) -> dict[str, object]:
    """The decoded inputs a request for `task_id` about this patient would carry."""
    spec = CATALOG.task(task_id)
    if task_id == "medical_vqa":  # the text is the question, the image the one it asks about
        return {
            "text": patient.question,
            patient.vqa_modality: patient.inputs[patient.vqa_modality],
        }
    return {m: patient.inputs[m] for m in spec.accepted if m in patient.inputs}


def labels_json(patient: Patient) -> dict[str, object]:
    """Labels by name: str, list[str] (multi-label), list[float] (regression), "HHEC.." (per
    residue)."""
    return {
        tid: output_of(spec).to_json(patient.labels[tid], spec.labels)
        for tid, spec in CATALOG.tasks.items()
    }
