"""Held-out metrics per task, each with a bootstrap 95 % interval, against a trivial baseline
(majority class, or the training mean) and, on the synthetic cohort, the ceiling its generator
allows (`cohort/ceilings.py`); plus modality ablations: each accepted modality alone and each
one left out."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from multimed.models.cohort.ceilings import ceiling
from multimed.models.cohort.dataset import CohortTensors, TaskData, select
from multimed.models.cohort.synthetic import Patient
from multimed.models.outputs import Output, output_of
from multimed.models.trust import calibration, novelty_input

EVAL_BATCH = 128
BOOTSTRAP = 200  # resamples of the test items behind each 95 % interval


@torch.no_grad()
def _raw_outputs(model, data: CohortTensors, task: TaskData, idx: Tensor, present: Tensor):
    chunks = [
        model.task_outputs(data, task, idx[i : i + EVAL_BATCH], present[i : i + EVAL_BATCH])
        for i in range(0, len(idx), EVAL_BATCH)
    ]
    return output_of(task.spec).cat(chunks)


def task_raw(model, data: CohortTensors, task: TaskData, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Uncalibrated raw outputs and targets of the items of `idx` that a request could carry."""
    present = task.present[idx]
    keep = present.any(1)
    idx, present = idx[keep], present[keep]
    return _raw_outputs(model, data, task, idx, present), task.target[idx]


def calibration_report(model, data: CohortTensors, test_idx: Tensor) -> dict:
    """Per task with probability scores: its temperature, and ECE / Brier / NLL on the test
    split before (T = 1) and after calibration."""
    out = {}
    for t, task in data.tasks.items():
        output = output_of(task.spec)
        if not output.calibrated:
            continue
        raw, target = task_raw(model, data, task, test_idx)
        temperature = float(model.task_models.tasks[t].temperature)
        out[t] = {
            "temperature": round(temperature, 3),
            "before": calibration(output, raw, target),
            "after": calibration(output, raw / temperature, target),
        }
    return out


@torch.no_grad()
def novelty_inputs(model, parts: list[tuple[CohortTensors, Tensor]], modality: str) -> Tensor:
    """What the OOD score reads ([N, K], `trust.novelty_input`) for every `modality` input the
    items of `idx` have, from each (data, idx) part: all its sources (a clinical note and a VQA
    question are both text)."""
    out = []
    for data, idx in parts:
        sources: dict[str, Tensor] = {}
        for task in data.tasks.values():
            if modality in task.sources:
                j = task.spec.accepted.index(modality)
                have = task.available[idx, j]
                key = task.sources[modality]
                sources[key] = sources[key] | have if key in sources else have
        for key, have in sources.items():
            chosen = idx[have]
            for i in range(0, len(chosen), EVAL_BATCH):
                batch = select(data.inputs[key], chosen[i : i + EVAL_BATCH])
                encoded = model.encoders[modality](batch)
                out.append(novelty_input(encoded.pooled, encoded.descriptor))
    return torch.cat(out)


def flagged_share(model, parts: list[tuple[CohortTensors, Tensor]], modality: str) -> dict:
    """How many in-distribution held-out inputs the OOD flag marks (about 5 % by design)."""
    flags = model.task_models.novelty[modality].flags(novelty_inputs(model, parts, modality))
    share = sum(f.flagged for f in flags) / max(1, len(flags))
    return {"n": len(flags), "flagged": round(share, 4)}


def interval(output: Output, raw: Tensor, target: Tensor, seed: int = 0) -> list[float]:
    """The metric's 95 % bootstrap interval over the items (percentile method)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(BOOTSTRAP):
        pick = torch.randint(len(target), (len(target),), generator=gen)
        value = metric_or_nan(output, raw[pick], target[pick])
        if np.isfinite(value):  # an AUROC is undefined for a resample without a label's positives
            values.append(value)
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]


def metric_or_nan(output: Output, raw: Tensor, target: Tensor) -> float:
    """The metric, or NaN where it is undefined (an AUROC without a label's positives)."""
    with warnings.catch_warnings():  # scikit-learn warns, then gives NaN, or raises: both skip
        warnings.simplefilter("ignore")
        try:
            return output.metric(raw, target)
        except ValueError:
            return math.nan


def scored(model, data, task: TaskData, idx: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """Raw outputs and targets of the items of `idx` with `present` modalities (those with none
    left out)."""
    keep = present.any(1)
    idx, present = idx[keep], present[keep]
    return _raw_outputs(model, data, task, idx, present), task.target[idx]


def _score(model, data, task: TaskData, idx: Tensor, present: Tensor) -> float | None:
    if not present.any():
        return None
    raw, target = scored(model, data, task, idx, present)
    return round(output_of(task.spec).metric(raw, target), 4)


def evaluate(
    model,
    data: CohortTensors,
    train_idx: Tensor,
    test_idx: Tensor,
    patients: Sequence[Patient] | None = None,
) -> dict:
    """-> {"tasks": {task: {metric, value, interval, baseline, ceiling, n}}, "ablations": {task:
    {subset: value}}}. `patients`: the test items' synthetic patients, for the ceilings."""
    was_training = model.training
    model.eval()
    tasks, ablations = {}, {}
    for t, task in data.tasks.items():
        output = output_of(task.spec)
        present = task.present[test_idx]
        raw, target = scored(model, data, task, test_idx, present)
        baseline = output.baseline(task.target[train_idx], task.target[test_idx])
        tasks[t] = {
            "metric": task.spec.metric,
            "value": round(output.metric(raw, target), 4),
            "interval": interval(output, raw, target),
            "baseline": round(baseline, 4),
            "ceiling": None if patients is None else ceiling(t, patients),
            "n": len(target),
        }
        used = [j for j, m in enumerate(task.spec.accepted) if m in task.sources]
        if len(used) > 1:
            rows = {}
            for j in used:
                m = task.spec.accepted[j]
                only = torch.zeros_like(present)
                only[:, j] = present[:, j]
                rows[f"only:{m}"] = _score(model, data, task, test_idx, only)
                without = present.clone()
                without[:, j] = False
                rows[f"without:{m}"] = _score(model, data, task, test_idx, without)
            ablations[t] = rows
    model.train(was_training)
    return {"tasks": tasks, "ablations": ablations}


def _row(name: str, r: dict) -> str:
    lo, hi = r["interval"]
    ceiling = "" if r.get("ceiling") is None else f"{r['ceiling']:8.3f}"
    if "logistic_regression" in r:  # real data: the same split's logistic regression instead
        ceiling = f"  LR {r['logistic_regression']:.3f}"
    return (
        f"{name:44s} {r['metric']:18s} {r['value']:6.3f} [{lo:.3f}, {hi:.3f}]"
        f" {r['baseline']:8.3f} {ceiling}"
    )


def format_table(metrics: dict) -> str:
    lines = [f"{'task (test split)':44s} {'metric':18s} {'value [95% CI]':>22s} baseline  ceiling"]
    lines += [_row(t, r) for t, r in metrics["tasks"].items()]
    for source, rows in metrics.get("real_data", {}).items():
        lines += [_row(f"{t} ({source})", r) for t, r in rows.items()]
    for t, rows in metrics.get("ablations", {}).items():
        cells = ", ".join(f"{k}={v:.3f}" for k, v in rows.items() if v is not None)
        lines.append(f"  ablation {t}: {cells}")
    calibrated = metrics.get("calibration", {})
    if calibrated:
        lines.append(f"{'calibration (test split)':40s} {'T':>6s}   ECE before -> after   NLL")
    for t, r in calibrated.items():
        b, a = r["before"], r["after"]
        lines.append(
            f"{t:40s} {r['temperature']:6.2f}   {b['ece']:.3f} -> {a['ece']:.3f}"
            f"        {b['nll']:.3f} -> {a['nll']:.3f}"
        )
    ood = metrics.get("out_of_distribution", {})
    if ood:
        lines.append("out-of-distribution flag: threshold, share of held-out inputs flagged")
        cells = (f"{m} {r['threshold']:.2f} ({r['flagged']:.0%})" for m, r in ood.items())
        lines.append("  " + ", ".join(cells))
    return "\n".join(lines)
