"""What a load test sends: per task, a list of distinct requests' inputs, read from a
cohort that `multimed synth` wrote or synthesised in memory from the seeded cohort generator,
rendered in each modality's real wire format (DICOM, PNG, EDF, FASTA, gene counts, text).

The cohort code imports torch (and its generator scanpy's bundled data), so it is imported inside
the functions that need it: the load generator itself stays as light as the SDK. Tasks come with
weights (`TASK:WEIGHT`), by which they share the requests."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from multimed.client.files import read_input
from multimed.models.catalog import CATALOG, InputForm, TaskSpec
from multimed.models.inputs import RawInput

Inputs = dict[str, RawInput]


def parse_task(text: str) -> tuple[str, int]:
    """'TASK' or 'TASK:WEIGHT' -> (task, weight)."""
    task, _, weight = text.partition(":")
    try:
        return task, int(weight or 1)
    except ValueError:
        raise ValueError(f"--task {text!r}: expected TASK or TASK:WEIGHT") from None


def shares(weights: Sequence[int], total: int) -> list[int]:
    """How many inputs each task needs so that `total` requests, dealt in rounds of
    sum(weights) by weight, never run one task short before the others."""
    rounds = math.ceil(total / sum(weights))
    return [rounds * w for w in weights]


def choose(spec: TaskSpec, available: Mapping[str, object], index: int, every: bool) -> list[str]:
    """The modalities one request carries: with `every`, each accepted one available; else the
    required ones, all_of and one of any_of, taking turns by `index` so that the load reaches
    every encoder the task can use."""
    missing = [m for m in spec.all_of if m not in available]
    choices = [m for m in spec.any_of if m in available]
    if missing or (spec.any_of and not choices):
        needs = ", ".join(missing) or f"one of {', '.join(spec.any_of)}"
        raise ValueError(f"task {spec.id!r} needs {needs}, which these inputs lack")
    if every:
        return [m for m in spec.accepted if m in available]
    return list(spec.all_of) + ([choices[index % len(choices)]] if choices else [])


def distinct_text(inputs: Inputs, reference: str) -> Inputs:
    """Notes and questions come from a few templates; a reference makes each text its own, so
    that the router's embedding cache (keyed by content) cannot answer a repeat."""
    text = inputs.get("text")
    if text is None:
        return inputs
    return {**inputs, "text": RawInput("text", InputForm.TEXT, f"{text.data} [{reference}]")}


def synthetic_inputs(
    tasks: Sequence[tuple[str, int]],
    total: int,
    seed: int = 0,
    every: bool = False,
) -> dict[str, list[Inputs]]:
    """Per task its share of `total` inputs from seeded synthetic patients, none shared between
    tasks (the cache is shared between tasks too). Only the modalities sent are rendered."""
    from multimed.models.cohort.synthetic import generate_patient, task_inputs
    from multimed.models.cohort.writer import to_wire

    counts = shares([w for _, w in tasks], total)
    out: dict[str, list[Inputs]] = {}
    patient = 0
    for (task, _), count in zip(tasks, counts, strict=True):
        spec, out[task] = CATALOG.task(task), []
        for i in range(count):
            p = generate_patient(patient, seed)
            decoded = task_inputs(p, task)
            chosen = {m: to_wire(m, decoded[m], p.id) for m in choose(spec, decoded, i, every)}
            out[task].append(distinct_text(chosen, p.id))
            patient += 1
    return out


def cohort_inputs(
    folder: Path, tasks: Sequence[tuple[str, int]], total: int, every: bool = False
) -> dict[str, list[Inputs]]:
    """Per task its share of the first `total` patients in `folder` (each patient goes to one
    task, so that no input is sent for two), read from the files `multimed synth` wrote."""
    from multimed.models.cohort.writer import FILES, QUESTION_FILE

    labels = json.loads((folder / "labels.json").read_text())
    patients: Iterator[str] = iter(sorted(labels))
    counts = shares([w for _, w in tasks], min(total, len(labels)))
    out: dict[str, list[Inputs]] = {}
    for (task, _), count in zip(tasks, counts, strict=True):
        spec, out[task] = CATALOG.task(task), []
        for i, patient in zip(range(count), patients, strict=False):
            files = {m: folder / patient / f for m, f in FILES.items()}
            files = {m: path for m, path in files.items() if path.exists()}
            if task == "medical_vqa":  # as the generator's task_inputs: the question, its image
                image = labels[patient]["vqa_modality"]
                files = {"text": folder / patient / QUESTION_FILE, image: files[image]}
            chosen = {m: read_input(m, files[m]) for m in choose(spec, files, i, every)}
            out[task].append(distinct_text(chosen, patient))
        if not out[task]:
            raise ValueError(f"{folder} has too few patients for {len(tasks)} tasks")
    return out
