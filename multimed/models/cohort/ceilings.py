"""The score the synthetic cohort allows per task: an oracle that reads the latent state each
renderer drew (which class a scan shows, a finding's amplitude, a bar's length) and answers as
Bayes would from it, scored with the task's own metric. What the inputs add on top (pixel noise,
speckle, Poisson counts) only lowers what a model can reach, so a ceiling is an upper bound.
Tasks whose optimum has no closed form here (motor imagery, protein structure) have none."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from multimed.models.catalog import CATALOG
from multimed.models.cohort.synthetic import (
    AGE_BANDS,
    BAR_NOISE,
    CELL_TYPES,
    DISEASES,
    IMAGING,
    P_FINDING,
    P_SHOW,
    P_SYMPTOM,
    RETINA,
    TUMOURS,
    VQA_ANSWERS,
    Patient,
    expected_expression,
    vqa_answer,
)
from multimed.models.outputs import output_of

_LOG_TINY = -30.0  # log-probability of what the oracle rules out


def _one_hot(index: Sequence[int], n: int) -> Tensor:
    raw = torch.full((len(index), n), _LOG_TINY)
    raw[torch.arange(len(index)), torch.as_tensor(list(index))] = 0.0
    return raw


def _disease(patients: Sequence[Patient], modalities: set[str]) -> Tensor:
    """Log posterior over diseases from the class each used scan shows and the note's symptom:
    each shows the truth with probability P_SHOW, else a uniformly random class."""
    k = len(DISEASES)

    def evidence(shown: int, p: float) -> np.ndarray:
        return np.log(p * (np.arange(k) == shown) + (1 - p) / k)

    rows = []
    for patient in patients:
        z = patient.latent
        log_p = sum(evidence(z["disease_shown"][m], P_SHOW) for m in IMAGING if m in modalities)
        if "text" in modalities:
            log_p = log_p + evidence(z["symptom"], P_SYMPTOM)
        rows.append(log_p)
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def _findings(patients: Sequence[Patient], modalities: set[str]) -> Tensor:
    """Logit of P(finding | its dot's amplitude): present dots are U(0.12, 0.45); absent slots
    are empty, or hold a faint U(0.03, 0.18) dot 30 % of the time."""
    amp = np.stack([p.latent["finding_amplitudes"] for p in patients])
    on = np.where((amp >= 0.12) & (amp <= 0.45), 1 / 0.33, 0.0) * P_FINDING
    off = np.where((amp >= 0.03) & (amp <= 0.18), 0.3 / 0.15, 0.0) * (1 - P_FINDING)
    off = np.where(amp == 0, 1.0, off)  # the point mass of an empty slot
    posterior = np.clip(on / (on + off), 1e-6, 1 - 1e-6)
    return torch.tensor(np.log(posterior / (1 - posterior)), dtype=torch.float32)


def _bone_age(patients: Sequence[Patient], modalities: set[str]) -> Tensor:
    """Posterior over age bands from the bars' length (3 + age / 2 px, sd BAR_NOISE; ages
    uniform over the bands)."""

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    rows = []
    for patient in patients:
        length = patient.latent["bar_length"]
        p = [
            cdf((length - 3 - 0.5 * 5 * b) / BAR_NOISE)
            - cdf((length - 3 - 0.5 * 5 * (b + 1)) / BAR_NOISE)
            for b in range(len(AGE_BANDS))
        ]
        rows.append(np.log(np.maximum(p, 1e-12)))
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def _retina(patients: Sequence[Patient], modalities: set[str]) -> Tensor:
    """What the scan shows: its lesion, or normal where the lesion does not show."""
    shown = [p.latent["retina"] if p.latent["oct_visible"] else 0 for p in patients]
    return _one_hot(shown, len(RETINA))


def _expression(patients: Sequence[Patient], modalities: set[str]) -> Tensor:
    """The explained part: DNA motifs, plus the cell type's context when scRNA is sent (its
    mean over types, zero, without)."""
    if "scrna" in modalities:
        rows = [expected_expression(p.latent) for p in patients]
    else:
        rows = [np.asarray(p.latent["motifs"], np.float32) for p in patients]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def _latent_class(key: str, n: int) -> Callable[[Sequence[Patient], set[str]], Tensor]:
    """The true class the inputs were rendered from, where only the annotation is noisy."""
    return lambda patients, modalities: _one_hot([p.latent[key] for p in patients], n)


def _vqa(patients: Sequence[Patient], modalities: set[str]) -> Tensor:
    """The answer the lesion shows to the question asked (presence, side or size): the ring is
    drawn on every imaging modality at a visible amplitude."""
    answers = [VQA_ANSWERS.index(vqa_answer(p.latent)) for p in patients]
    return _one_hot(answers, len(VQA_ANSWERS))


ORACLES: dict[str, Callable[[Sequence[Patient], set[str]], Tensor]] = {
    "disease_classification": _disease,
    "brain_tumor_classification": _latent_class("tumour", len(TUMOURS)),
    "breast_cancer_classification": _latent_class("malignant_shown", 2),
    "radiographic_findings_classification": _findings,
    "bone_age_classification": _bone_age,
    "diabetic_retinopathy_classification": _retina,
    "cell_type_classification": _latent_class("cell_type", len(CELL_TYPES)),
    "expression_prediction": _expression,
    "medical_vqa": _vqa,
}


def ceiling(
    task: str, patients: Sequence[Patient], modalities: set[str] | None = None
) -> float | None:
    """The oracle's score on these patients' labels, from the given modalities (default: all
    the task accepts); None where no oracle is derived."""
    oracle = ORACLES.get(task)
    if oracle is None or not patients:
        return None
    spec = CATALOG.task(task)
    used = set(spec.accepted) if modalities is None else modalities
    output = output_of(spec)
    target = output.targets([p.labels[task] for p in patients])
    return round(output.metric(oracle(patients, used), target), 4)
