import copy
import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from multimed.models.catalog import CATALOG, CELL_TYPES, PBMC_GENES, OutputKind
from multimed.models.codecs.types import EEGRecord, GeneCounts
from multimed.models.cohort import synthetic as S

SEED = 3


@pytest.fixture(scope="module")
def cohort():
    return S.generate_cohort(300, seed=SEED)


def _arrays(patient):
    """Every array in a patient, flattened to (name, array) for comparisons."""
    out = []
    for m, v in patient.inputs.items():
        if isinstance(v, EEGRecord):
            v = v.data
        elif isinstance(v, GeneCounts):
            v = v.counts
        out.append((m, np.asarray(v)))
    out += [(t, np.asarray(y)) for t, y in patient.labels.items()]
    return out


def _same(a, b):
    assert a.id == b.id and a.question == b.question and a.vqa_modality == b.vqa_modality
    for (name, x), (_, y) in zip(_arrays(a), _arrays(b), strict=True):
        assert np.array_equal(x, y), name


def test_deterministic_and_independent_of_n():
    five, ten = S.generate_cohort(5, seed=7), S.generate_cohort(10, seed=7)
    for a, b in zip(five, ten[:5], strict=True):
        _same(a, b)
    _same(S.generate_cohort(1, seed=7)[0], five[0])
    other = S.generate_cohort(1, seed=8)[0]
    assert not np.array_equal(other.inputs["xray"], five[0].inputs["xray"])


def test_shapes_dtypes_ranges(cohort):
    for p in cohort[:20]:
        x = p.inputs
        assert isinstance(x["text"], str) and x["text"] and p.question.endswith("?")
        for m, shape in (("xray", (1, 64, 64)), ("oct", (1, 64, 64)), ("pathology", (3, 64, 64))):
            assert x[m].shape == shape and x[m].dtype == np.float32
            assert x[m].min() >= 0 and x[m].max() <= 1
        assert x["ct"].shape == x["mri"].shape == (16, 64, 64)
        assert x["ct"].dtype == x["mri"].dtype == np.float32
        assert x["ct"].min() >= -1100 and np.median(x["ct"]) > -160  # body fills the field
        assert x["mri"].min() >= 0 and x["mri"].max() <= 1000
        eeg = x["eeg"]
        assert eeg.data.shape == (22, 1024) and eeg.data.dtype == np.float32
        assert eeg.channels == S.EEG_CHANNELS and eeg.sample_rate_hz == 256.0
        assert 2 < eeg.data.std() < 50  # microvolts
        assert len(x["genomics"]) == 200 and set(x["genomics"]) <= set("ACGT")
        counts = x["scrna"].counts
        assert counts.shape == (len(PBMC_GENES),) and counts.dtype == np.float32
        assert (counts >= 0).all() and np.array_equal(counts, np.round(counts))
        assert 40 <= len(x["protein"]) <= 120 and set(x["protein"]) <= set("ACDEFGHIKLMNPQRSTVWY")
        assert p.vqa_modality in S.VQA_MODALITIES


def test_labels_in_range_and_every_class_present(cohort):
    for tid, spec in CATALOG.tasks.items():
        ys = [p.labels[tid] for p in cohort]
        n = len(spec.labels)
        if spec.output == OutputKind.MULTI_LABEL:
            hot = np.array(ys)
            assert hot.shape == (len(cohort), n) and set(np.unique(hot)) <= {0, 1}
            assert (hot.mean(0) > 0.15).all() and (hot.mean(0) < 0.35).all()
        elif spec.output == OutputKind.REGRESSION:
            y = np.stack(ys)
            assert y.shape == (len(cohort), n) and y.dtype == np.float32
        elif spec.output == OutputKind.PER_TOKEN:
            for p, y in zip(cohort, ys, strict=True):
                assert y.dtype == np.int64 and len(y) == len(p.inputs["protein"])
                assert y.min() >= 0 and y.max() < n
        else:
            assert set(ys) == set(range(n)), tid  # every class appears (and nothing else)


def test_disease_pattern_agreement(cohort):
    expected = S.P_SHOW + (1 - S.P_SHOW) / 4
    truth = np.array([p.labels["disease_classification"] for p in cohort])
    for m in ("xray", "ct", "mri"):
        shown = np.array([p.latent["disease_shown"][m] for p in cohort])
        assert abs((shown == truth).mean() - expected) < 0.08, m


def _rendered(index: int, modality: str, latent: dict) -> np.ndarray:
    """What `modality`'s renderer draws from `latent` with cohort patient `index`'s own stream."""
    stream, render = S._RENDERERS[modality]
    streams = np.random.SeedSequence([SEED, index]).spawn(S._STREAMS)
    return render(np.random.default_rng(streams[stream]), copy.deepcopy(latent))


def _asks(question: str) -> tuple[str, str]:
    """The answers a question allows, read from its words alone."""
    q = question.lower()
    if "side" in q or "left or the right" in q:
        return "left", "right"
    if "big" in q or "size" in q or "small or large" in q:
        return "small", "large"
    return "yes", "no"


def test_vqa_answer_is_what_the_question_and_the_image_show(cohort):
    """Each patient's asked image is rendered again from its own random stream with the VQA
    lesion taken out, so the difference is the lesion as the model sees it: the answer is of the
    kind the question's words ask for, "no" exactly where nothing differs, the side the
    difference lies on, and "large" where it covers more pixels than any "small" one."""
    answers = CATALOG.task("medical_vqa").labels
    areas = {"small": [], "large": []}
    for index, p in enumerate(cohort):
        m, answer = p.vqa_modality, answers[p.labels["medical_vqa"]]
        assert answer in _asks(p.question), (p.id, p.question, answer)
        assert np.array_equal(_rendered(index, m, p.latent), p.inputs[m]), p.id
        without = copy.deepcopy(p.latent)
        without["vqa_lesion"]["present"] = False
        lesion = np.abs(p.inputs[m] - _rendered(index, m, without)).max(0)  # [64, 64]
        assert (lesion.max() > 0) == (answer != "no"), (p.id, answer)
        if answer in ("left", "right"):
            column = (lesion.sum(0) * np.arange(S.SIDE)).sum() / lesion.sum()
            assert ("left" if column < (S.SIDE - 1) / 2 else "right") == answer, (p.id, column)
        if answer in areas:
            areas[answer].append(int((lesion > lesion.max() / 2).sum()))
    assert min(map(len, areas.values())) > 20 and max(areas["small"]) < min(areas["large"]), areas


def test_task_inputs_and_labels_json(cohort):
    p = cohort[0]
    vqa = S.task_inputs(p, "medical_vqa")
    assert vqa["text"] == p.question and set(vqa) == {"text", p.vqa_modality}
    assert set(S.task_inputs(p, "disease_classification")) == {"xray", "ct", "mri", "text"}
    assert S.task_inputs(p, "disease_classification")["text"] == p.inputs["text"]
    for tid in CATALOG.tasks:
        CATALOG.task(tid).check_modalities(S.task_inputs(p, tid))
    js = S.labels_json(p)
    assert set(js) == set(CATALOG.tasks)
    assert js["cell_type_classification"] in CELL_TYPES
    assert len(js["protein_structure_prediction"]) == len(p.inputs["protein"])
    assert all(isinstance(v, float) for v in js["expression_prediction"])


def test_pbmc68k_real_cells():
    import anndata

    counts, labels = S.load_pbmc68k()
    assert counts.shape == (700, len(PBMC_GENES)) and counts.dtype == np.float32
    assert labels.dtype == np.int64 and set(labels) == set(range(len(CELL_TYPES)))
    # the pseudo-counts log-normalise back to the ranks of the real log expression
    with warnings.catch_warnings():  # old-format file
        warnings.simplefilter("ignore")
        raw = anndata.read_h5ad(S.pbmc68k_path()).raw.X.toarray()
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    for i in (0, 100, 350, 699):
        assert spearmanr(lognorm[i], raw[i]).statistic > 0.99


def test_synthetic_cells_come_from_the_real_training_cells_only():
    """The leak the issue found: held-out real cells must not shape the synthetic ones."""
    train, validation, test = S.pbmc_split()
    assert len(set(train) | set(validation) | set(test)) == 700
    assert not (set(train) & set(test)) and not (set(validation) & set(test))
    counts, _ = S.load_pbmc68k()
    drawn_from = {r.tobytes() for k in S._cell_model().profiles for r in k.astype(np.float32)}
    normalised = (counts / counts.sum(1, keepdims=True)).astype(np.float32)
    assert len(drawn_from) == len(train)
    assert all(normalised[i].tobytes() in drawn_from for i in train)
    assert not any(normalised[i].tobytes() in drawn_from for i in (*validation, *test))


def test_annotations_are_noisy_and_cells_vary_within_a_type(cohort):
    """Nothing is perfect by construction: about 1 in 12 tumour and cell labels is wrong, and two
    cells of one type are less alike than Poisson draws from one profile would be."""
    for true, label in (("tumour", "tumour_label"), ("cell_type", "cell_label")):
        wrong = np.mean([p.latent[true] != p.latent[label] for p in cohort])
        assert 0.03 < wrong < 0.18, (true, wrong)
    by_type = {}
    for p in cohort:
        by_type.setdefault(p.latent["cell_type"], []).append(p.inputs["scrna"].counts)
    cells = max(by_type.values(), key=len)
    shares = np.stack([c / c.sum() for c in cells])
    spread = shares.std(0)[shares.mean(0) > 0.01]
    poisson = np.sqrt(shares.mean(0) / np.mean([c.sum() for c in cells]))[shares.mean(0) > 0.01]
    assert (spread > 1.5 * poisson).mean() > 0.5


def test_ceilings_are_what_the_generator_allows(cohort):
    """The oracle's scores: known in closed form for the tasks with one noise source, and
    fusing modalities raises the disease ceiling as the generator plants it. (medical_vqa's is 1
    by construction, its oracle being the label's own rule: the images are checked against that
    rule above.)"""
    from multimed.models.cohort.ceilings import ceiling

    expected = {  # P(shown or annotated right) + P(wrong) / classes
        "breast_cancer_classification": 0.9,
        "brain_tumor_classification": S.P_LABEL + (1 - S.P_LABEL) / 4,
        "cell_type_classification": S.P_LABEL + (1 - S.P_LABEL) / 10,
    }
    for task, value in expected.items():
        assert abs(ceiling(task, cohort) - value) < 0.06, task
    assert ceiling("motor_imagery_classification", cohort) is None
    one = ceiling("disease_classification", cohort, {"xray"})
    three = ceiling("disease_classification", cohort, {"xray", "ct", "mri"})
    assert abs(one - (S.P_SHOW + (1 - S.P_SHOW) / 4)) < 0.08 and three > one + 0.1
    dna = ceiling("expression_prediction", cohort, {"genomics"})
    assert 0.2 < dna < ceiling("expression_prediction", cohort) - 0.3
