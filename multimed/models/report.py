"""`multimed report --out DIR`: every number and figure of the README's results section, from one
command, as Markdown tables (`report.md`), PNG figures and `results.json`.

- **Headline**: the default training on a fresh cohort seed (never developed on: development used
  seed 0 and its validation split), each test value with its bootstrap 95 % interval, the trivial
  baseline and the generator's ceiling; real data beside a logistic regression; calibration with
  reliability diagrams; the out-of-distribution flag on real scans, shifted cohorts and a real
  cell type held out of training.
- **Comparisons**: separately trained models on equal budgets (same cohort, split, epochs, batch),
  over several seeds: unimodal vs multimodal (late, early, attention fusion) for disease and VQA;
  single-task vs multitask; graded noise on the X-ray; the missing-modality matrix.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from multimed.models.catalog import CATALOG, InputForm
from multimed.models.cohort.ceilings import ceiling
from multimed.models.cohort.dataset import CohortTensors, Split, TaskData
from multimed.models.config import Frozen, ModelConfig
from multimed.models.errors import InputError
from multimed.models.evaluate import BOOTSTRAP, metric_or_nan, novelty_inputs, scored
from multimed.models.inputs import RawInput
from multimed.models.modalities.registry import build_pipelines
from multimed.models.model import Model
from multimed.models.outputs import output_of
from multimed.models.report_writer import write_report
from multimed.models.train import Prepared, TrainSettings, fit, prepare, seeded_model
from multimed.models.trust import novelty_input, reliability_bins

DISEASE, VQA = "disease_classification", "medical_vqa"
VQA_IMAGES = ("xray", "ct", "mri", "pathology")
SINGLE_TASK = {  # the task -> the modalities its single-task model reads
    DISEASE: ("text", "xray", "ct", "mri"),
    VQA: ("text", *VQA_IMAGES),
    "expression_prediction": ("genomics", "scrna"),
    "radiographic_findings_classification": ("xray", "text"),
}
# the task -> its single-task model (with attention fusion, as the multitask model)
SINGLE_TASK_MODEL = {
    DISEASE: "disease attention",
    VQA: "vqa attention",
    "expression_prediction": "expression_prediction single-task",
    "radiographic_findings_classification": "radiographic_findings_classification single-task",
}
NOISE_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # sd of Gaussian noise on X-ray pixels in [0, 1]
# pydicom's bundled real scans (CT and MR): the OOD flag should mark every one.
REAL_SCANS = {
    "ct": ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"),
    "mri": ("MR_small.dcm", "examples_overlay.dcm"),
}
SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "none": lambda v, rng: v,
    "noise 0.1 sd": lambda v, rng: v + rng.normal(0, 0.1 * float(v.std()), v.shape).astype(v.dtype),
    "noise 0.3 sd": lambda v, rng: v + rng.normal(0, 0.3 * float(v.std()), v.shape).astype(v.dtype),
    "intensity x1.5": lambda v, rng: v * np.float32(1.5),
    "intensity x0.6": lambda v, rng: v * np.float32(0.6),
}
HELD_OUT_MIN_CELLS = 30  # cell types with fewer real cells give too few positives for an AUROC


class ReportSettings(Frozen):
    seed: int = 2026  # the headline cohort: fresh (development used seed 0)
    patients: int = Field(TrainSettings().patients, ge=20)  # the headline: the default training's
    epochs: int = Field(TrainSettings().epochs, ge=1)
    # The comparisons: every model on the same cohort, split, epochs and batches, per seed.
    seeds: tuple[int, ...] = (11, 12, 13)
    comparison_patients: int = Field(1000, ge=20)
    comparison_epochs: int = Field(8, ge=1)


QUICK = ReportSettings(
    seed=2026, patients=80, epochs=1, seeds=(11,), comparison_patients=80, comparison_epochs=1
)


@dataclass(frozen=True)
class Scored:
    """One model's raw outputs and targets on one seed's test items."""

    task: str
    raw: Tensor
    target: Tensor

    def value(self, pick: Tensor | None = None) -> float:
        """The metric on the items, or on a resample of them (NaN where undefined)."""
        output = output_of(CATALOG.task(self.task))
        if pick is None:
            return output.metric(self.raw, self.target)
        return metric_or_nan(output, self.raw[pick], self.target[pick])


def summarise(runs: Sequence[Scored], against: Sequence[Scored] | None = None) -> dict:
    """Mean over seeds with a 95 % interval: bootstrap over each seed's test items, the seeds'
    values averaged per resample. With `against` (the same items, another model), the paired
    difference runs - against instead."""
    gen = torch.Generator().manual_seed(0)
    seeds = [r.value() - (against[i].value() if against else 0) for i, r in enumerate(runs)]
    draws = []
    for _ in range(BOOTSTRAP):
        values = []
        for i, run in enumerate(runs):
            pick = torch.randint(len(run.target), (len(run.target),), generator=gen)
            values.append(run.value(pick) - (against[i].value(pick) if against else 0))
        if np.isfinite(values).all():  # an AUROC resample without a label's positives: skip
            draws.append(np.mean(values))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {
        "mean": round(float(np.mean(seeds)), 4),
        "interval": [round(lo, 4), round(hi, 4)],
        "seeds": [round(v, 4) for v in seeds],
    }


def score(model: Model, data: CohortTensors, task: str, idx: Tensor, present: Tensor) -> Scored:
    return Scored(task, *scored(model, data, data.tasks[task], idx, present))


def subset_mask(task: TaskData, modalities: Sequence[str]) -> Tensor:
    return torch.tensor([m in modalities for m in task.spec.accepted])


# --- headline ---


def reliability(model: Model, prep: Prepared) -> dict:
    """Per calibrated task, per confidence bin: mean confidence and accuracy, before and after."""
    out = {}
    for t, task in prep.data.tasks.items():
        output = output_of(task.spec)
        if not output.calibrated:
            continue
        raw = score(model, prep.data, t, prep.split.test, task.present[prep.split.test])
        temperature = float(model.task_models.tasks[t].temperature)
        out[t] = {}
        for name, logits in (("before", raw.raw), ("after", raw.raw / temperature)):
            out[t][name] = reliability_bins(*output.events(logits, raw.target))
    return out


def real_scan_scores(model: Model) -> list[dict]:
    """Each of REAL_SCANS sent as a one-file series, as a PACS would: its score and flag."""
    from pydicom.data import get_testdata_file

    rows = []
    for modality, names in REAL_SCANS.items():
        pipeline, novelty = model.pipelines[modality], model.task_models.novelty[modality]
        for name in names:
            # download=False: these ship inside pydicom; nothing is fetched at run time
            data = Path(get_testdata_file(name, download=False)).read_bytes()
            series = RawInput(modality, InputForm.DICOM_SERIES, [data])
            try:
                batch = pipeline.collate([pipeline.prepare(series)])
            except InputError as error:
                rows.append({"modality": modality, "file": name, "refused": str(error)})
                continue
            [flag] = novelty.flags(_novelty_batch(model, modality, batch))
            rows.append(
                {
                    "modality": modality,
                    "file": name,
                    "score": round(flag.score, 3),
                    "threshold": round(flag.threshold, 3),
                    "flagged": flag.flagged,
                }
            )
    return rows


@torch.no_grad()
def _novelty_batch(model: Model, modality: str, batch: dict) -> Tensor:
    out = model.encoders[modality].eval()(batch)
    return novelty_input(out.pooled, out.descriptor)


def shifted_scores(model: Model, prep: Prepared) -> dict:
    """Mean OOD score and share flagged of the test patients' CT and MRI under each shift."""
    rng = np.random.default_rng(0)
    test = [prep.patients[i] for i in prep.split.test]
    out = {}
    for modality in ("ct", "mri", "xray"):
        pipeline, novelty = model.pipelines[modality], model.task_models.novelty[modality]
        out[modality] = {}
        for shift, apply in SHIFTS.items():
            items = []
            for p in test:
                volume = apply(np.asarray(p.inputs[modality]), rng)
                if modality == "xray":  # an image's pixels live in [0, 1]
                    volume = np.clip(volume, 0, 1)
                items.append(pipeline.preprocess(volume))
            scores = novelty(_novelty_batch(model, modality, pipeline.collate(items)))
            out[modality][shift] = {
                "mean": round(float(scores.mean()), 3),
                "flagged": round(float((scores > novelty.threshold).float().mean()), 3),
            }
    return out


def _without(idx: Tensor, of: Tensor, k: int) -> Tensor:
    return idx[of[idx] != k]


def held_out_cell_type(
    prep: Prepared, settings: TrainSettings, config: ModelConfig, k: int
) -> dict:
    """An scRNA model trained without cell type k (its synthetic and real cells removed from
    training and validation), then the AUROC of its OOD score for every real cell of type k
    against the real test cells of the other types, and the share of type k flagged."""
    from sklearn.metrics import roc_auc_score

    task = "cell_type_classification"
    real = prep.real["pbmc68k_reduced"]
    labels = real.data.tasks[task].target
    latent = torch.tensor([p.latent["cell_type"] for p in prep.patients])
    rs, cs = real.split, prep.split
    part = replace(
        real,
        split=Split(_without(rs.train, labels, k), _without(rs.validation, labels, k), rs.test),
    )
    held = replace(
        prep.restricted([task], ["scrna"]),
        split=Split(_without(cs.train, latent, k), _without(cs.validation, latent, k), cs.test),
        real={"pbmc68k_reduced": part},
    )
    model = seeded_model(build_pipelines(config), config, settings.seed)
    fit(held, settings, model)
    novelty = model.task_models.novelty["scrna"]
    positives = torch.nonzero(labels == k).flatten()
    negatives = rs.test[labels[rs.test] != k]
    scores = novelty(
        novelty_inputs(model, [(real.data, torch.cat([positives, negatives]))], "scrna")
    )
    truth = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    return {
        "cells": len(positives),
        "auroc": round(float(roc_auc_score(truth, scores.numpy())), 3),
        "flagged": round(float((scores[: len(positives)] > novelty.threshold).float().mean()), 3),
    }


def held_out_cell_types(prep: Prepared, settings: TrainSettings, config: ModelConfig) -> dict:
    """`held_out_cell_type` for each real cell type with enough cells for an AUROC."""
    if "pbmc68k_reduced" not in prep.real:
        return {}
    labels = prep.real["pbmc68k_reduced"].data.tasks["cell_type_classification"].target
    return {
        name: held_out_cell_type(prep, settings, config, k)
        for k, name in enumerate(CATALOG.task("cell_type_classification").labels)
        if int((labels == k).sum()) >= HELD_OUT_MIN_CELLS
    }


def headline(settings: ReportSettings, progress: Callable[[str], None]) -> dict:
    config = ModelConfig()
    train_settings = TrainSettings(
        seed=settings.seed, patients=settings.patients, epochs=settings.epochs
    )
    pipelines = build_pipelines(config)
    progress("headline: cohort")
    prep = prepare(train_settings, pipelines)
    model = seeded_model(pipelines, config, settings.seed)
    progress("headline: training")
    seconds = fit(prep, train_settings, model)
    progress("headline: evaluation")
    metrics = prep.evaluate(model)
    progress("headline: out-of-distribution")
    ood = {
        "real_scans": real_scan_scores(model),
        "shifted": shifted_scores(model, prep),
    }
    progress("headline: held-out cell types")
    ood["held_out_cell_types"] = held_out_cell_types(prep, train_settings, config)
    return {
        "settings": train_settings.model_dump(mode="json"),
        "seconds": round(seconds, 1),
        "metrics": metrics,
        "reliability": reliability(model, prep),
        "out_of_distribution": ood,
    }


# --- comparisons ---


@dataclass(frozen=True)
class Trained:
    name: str
    tasks: tuple[str, ...]
    modalities: tuple[str, ...]
    fusion: str = "attention"


def comparison_models() -> list[Trained]:
    models = [Trained(f"disease {m} only", (DISEASE,), (m,)) for m in SINGLE_TASK[DISEASE]]
    models += [
        Trained(f"disease {f}", (DISEASE,), SINGLE_TASK[DISEASE], f)
        for f in ("late", "early", "attention")
    ]
    models += [
        Trained("vqa question only", (VQA,), ("text",)),
        Trained("vqa image only", (VQA,), VQA_IMAGES),
    ]
    models += [
        Trained(f"vqa {f}", (VQA,), SINGLE_TASK[VQA], f) for f in ("late", "early", "attention")
    ]
    models += [
        Trained(f"{t} single-task", (t,), SINGLE_TASK[t])
        for t in SINGLE_TASK
        if t not in (DISEASE, VQA)
    ]
    models.append(Trained("multitask", tuple(CATALOG.tasks), tuple(CATALOG.modalities)))
    return models


def _subsets(modalities: Sequence[str]) -> Iterator[tuple[str, ...]]:
    for n in range(1, len(modalities) + 1):
        yield from itertools.combinations(modalities, n)


def _noised(prep: Prepared, model: Model, sigma: float, seed: int) -> CohortTensors:
    """The cohort with Gaussian noise on the test patients' X-rays (pixels in [0, 1])."""
    pipeline, rng = model.pipelines["xray"], np.random.default_rng(seed)
    batch = dict(prep.data.inputs["xray"])
    key = pipeline.model_input().key
    batch[key] = batch[key].clone()
    for i in prep.split.test.tolist():
        image = prep.patients[i].inputs["xray"]
        noisy = np.clip(image + rng.normal(0, sigma, image.shape), 0, 1).astype(np.float32)
        batch[key][i] = pipeline.preprocess(noisy)[key]
    return replace(prep.data, inputs={**prep.data.inputs, "xray": batch})


def compare_seed(seed: int, settings: ReportSettings, progress: Callable[[str], None]) -> dict:
    """Every comparison model on one seed's cohort -> {model: {...Scored}} for the summaries."""
    train_settings = TrainSettings(
        seed=seed, patients=settings.comparison_patients, epochs=settings.comparison_epochs
    )
    config = ModelConfig()
    pipelines = build_pipelines(config)
    progress(f"seed {seed}: cohort")
    prep = prepare(train_settings, pipelines)
    test = prep.split.test
    out: dict = {"values": {}, "matrix": {}, "noise": {}}
    for trained in comparison_models():
        progress(f"seed {seed}: {trained.name}")
        narrowed = prep.restricted(trained.tasks, trained.modalities)
        fusion_config = ModelConfig(fusion=trained.fusion)
        model = seeded_model(build_pipelines(fusion_config), fusion_config, seed)
        fit(narrowed, train_settings, model)
        model.eval()
        for t in trained.tasks:
            if t not in SINGLE_TASK:
                continue
            task = narrowed.data.tasks[t]
            out["values"][(trained.name, t)] = score(
                model, narrowed.data, t, test, task.present[test]
            )
        if DISEASE in trained.tasks and len(trained.modalities) > 1:
            task = narrowed.data.tasks[DISEASE]
            for subset in _subsets(SINGLE_TASK[DISEASE]):
                present = task.present[test] & subset_mask(task, subset)
                out["matrix"][(trained.name, subset)] = score(
                    model, narrowed.data, DISEASE, test, present
                )
        if trained.name in ("disease xray only", "disease attention", "multitask"):
            for sigma in NOISE_LEVELS:
                noised = replace(narrowed, data=_noised(narrowed, model, sigma, seed))
                task = noised.data.tasks[DISEASE]
                out["noise"][(trained.name, sigma)] = score(
                    model, noised.data, DISEASE, test, task.present[test]
                )
    out["ceilings"] = {
        subset: ceiling(DISEASE, [prep.patients[i] for i in test], set(subset))
        for subset in _subsets(SINGLE_TASK[DISEASE])
    }
    return out


def comparisons(settings: ReportSettings, progress: Callable[[str], None]) -> dict:
    per_seed = [compare_seed(s, settings, progress) for s in settings.seeds]

    def runs(key_of: str, key) -> list[Scored]:
        return [seed[key_of][key] for seed in per_seed]

    values = {
        f"{name} | {t}": summarise(runs("values", (name, t))) for name, t in per_seed[0]["values"]
    }
    multitask_gain = {
        t: summarise(runs("values", ("multitask", t)), against=runs("values", (single, t)))
        for t, single in SINGLE_TASK_MODEL.items()
    }
    matrix = {
        f"{name} | {'+'.join(subset)}": summarise(runs("matrix", (name, subset)))
        for name, subset in per_seed[0]["matrix"]
    }
    noise = {
        f"{name} | {sigma}": summarise(runs("noise", (name, sigma)))
        for name, sigma in per_seed[0]["noise"]
    }
    ceilings = {
        "+".join(subset): round(float(np.mean([s["ceilings"][subset] for s in per_seed])), 4)
        for subset in per_seed[0]["ceilings"]
    }
    return {
        "settings": {
            "seeds": list(settings.seeds),
            "patients": settings.comparison_patients,
            "epochs": settings.comparison_epochs,
        },
        "values": values,
        "multitask_minus_single_task": multitask_gain,
        "missing_modality_matrix": matrix,
        "disease_ceilings": ceilings,
        "xray_noise": noise,
    }


def steps(settings: ReportSettings) -> int:
    """How many times `build_report` calls `progress` (for a progress bar)."""
    return 5 + len(settings.seeds) * (1 + len(comparison_models()))


def build_report(out: Path, settings: ReportSettings, progress: Callable[[str], None]) -> dict:
    results = {
        "headline": headline(settings, progress),
        "comparisons": comparisons(settings, progress),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, results)
    return results
