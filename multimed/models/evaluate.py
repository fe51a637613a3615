"""Held-out metrics per task against a trivial baseline (majority class, or the training mean),
plus modality ablations: each accepted modality alone and each one left out."""

from __future__ import annotations

import torch
from torch import Tensor

from multimed.models.cohort.dataset import CohortTensors, TaskData
from multimed.models.outputs import output_of

EVAL_BATCH = 128


@torch.no_grad()
def _raw_outputs(model, data: CohortTensors, task: TaskData, idx: Tensor, present: Tensor):
    chunks = [
        model.task_outputs(data, task, idx[i : i + EVAL_BATCH], present[i : i + EVAL_BATCH])
        for i in range(0, len(idx), EVAL_BATCH)
    ]
    return output_of(task.spec).cat(chunks)


def _score(model, data, task: TaskData, idx: Tensor, present: Tensor) -> float | None:
    keep = present.any(1)
    if not keep.any():
        return None
    idx, present = idx[keep], present[keep]
    raw = _raw_outputs(model, data, task, idx, present)
    return round(output_of(task.spec).metric(raw, task.target[idx]), 4)


def evaluate(model, data: CohortTensors, train_idx: Tensor, test_idx: Tensor) -> dict:
    """-> {"tasks": {task: {metric, value, baseline}}, "ablations": {task: {subset: value}}}."""
    was_training = model.training
    model.eval()
    tasks, ablations = {}, {}
    for t, task in data.tasks.items():
        present = task.present[test_idx]
        baseline = output_of(task.spec).baseline(task.target[train_idx], task.target[test_idx])
        tasks[t] = {
            "metric": task.spec.metric,
            "value": _score(model, data, task, test_idx, present),
            "baseline": round(baseline, 4),
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
