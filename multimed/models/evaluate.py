"""Held-out metrics per task against a trivial baseline (majority class, or the training mean),
plus modality ablations: each accepted modality alone and each one left out."""

from __future__ import annotations

import torch
from sklearn.metrics import r2_score, roc_auc_score
from torch import Tensor

from multimed.models.catalog import OutputKind
from multimed.models.dataset import CohortTensors, TaskData

EVAL_BATCH = 128


def _metric(kind: OutputKind, raw: Tensor, target: Tensor) -> float:
    if kind in (OutputKind.SINGLE_LABEL, OutputKind.ANSWER):
        return float((raw.argmax(-1) == target).float().mean())
    if kind is OutputKind.MULTI_LABEL:
        return float(roc_auc_score(target.numpy(), raw.numpy(), average="macro"))
    if kind is OutputKind.REGRESSION:
        return float(r2_score(target.numpy(), raw.numpy()))
    mask = target >= 0
    return float((raw.argmax(-1)[mask] == target[mask]).float().mean())


def _baseline(kind: OutputKind, train: Tensor, test: Tensor) -> float:
    """The metric of a predictor that ignores its inputs, fitted on the training labels."""
    n_test = test.shape[0]
    if kind in (OutputKind.SINGLE_LABEL, OutputKind.ANSWER):
        majority = torch.bincount(train).argmax()
        return float((test == majority).float().mean())
    if kind is OutputKind.MULTI_LABEL:
        return _metric(kind, torch.full(test.shape, 0.5), test)
    if kind is OutputKind.REGRESSION:
        return _metric(kind, train.mean(0).expand(n_test, -1), test)
    majority = torch.bincount(train[train >= 0]).argmax()
    mask = test >= 0
    return float((test[mask] == majority).float().mean())


@torch.no_grad()
def _raw_outputs(model, data: CohortTensors, task: TaskData, idx: Tensor, present: Tensor):
    chunks = [
        model.task_outputs(data, task, idx[i : i + EVAL_BATCH], present[i : i + EVAL_BATCH])
        for i in range(0, len(idx), EVAL_BATCH)
    ]
    if task.spec.output is OutputKind.PER_TOKEN:
        longest = max(c.shape[1] for c in chunks)
        chunks = [torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in chunks]
    return torch.cat(chunks)


def _score(model, data, task: TaskData, idx: Tensor, present: Tensor) -> float | None:
    keep = present.any(1)
    if not keep.any():
        return None
    idx, present = idx[keep], present[keep]
    raw = _raw_outputs(model, data, task, idx, present)
    target = task.target[idx]
    if task.spec.output is OutputKind.PER_TOKEN:
        target = target[:, : raw.shape[1]]
    return round(_metric(task.spec.output, raw, target), 4)


def evaluate(model, data: CohortTensors, train_idx: Tensor, test_idx: Tensor) -> dict:
    """-> {"tasks": {task: {metric, value, baseline}}, "ablations": {task: {subset: value}}}."""
    was_training = model.training
    model.eval()
    tasks, ablations = {}, {}
    for t, task in data.tasks.items():
        present = task.present[test_idx]
        kind = task.spec.output
        tasks[t] = {
            "metric": task.spec.metric,
            "value": _score(model, data, task, test_idx, present),
            "baseline": round(_baseline(kind, task.target[train_idx], task.target[test_idx]), 4),
            "n": len(test_idx),
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


def format_table(metrics: dict) -> str:
    lines = [f"{'task':40s} {'metric':20s} {'value':>8s} {'baseline':>9s}"]
    for t, r in metrics["tasks"].items():
        lines.append(f"{t:40s} {r['metric']:20s} {r['value']:8.3f} {r['baseline']:9.3f}")
    for source, rows in metrics.get("real_data", {}).items():
        for t, r in rows.items():
            name = f"{t} ({source})"
            lines.append(f"{name:40s} {r['metric']:20s} {r['value']:8.3f} {r['baseline']:9.3f}")
    for t, rows in metrics.get("ablations", {}).items():
        cells = ", ".join(f"{k}={v:.3f}" for k, v in rows.items() if v is not None)
        lines.append(f"  ablation {t}: {cells}")
    return "\n".join(lines)
