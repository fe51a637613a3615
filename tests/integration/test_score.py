"""`multimed score` (Ray Data, offline) against the online server: the same bundle and inputs give
the same answers; a bad item is recorded as its own error; a stopped run resumes where it was."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from hospital import study_uid, upload

from multimed.client.files import read_input
from multimed.models.catalog import CATALOG
from multimed.models.cohort.writer import write_cohort
from multimed.services.score import item_inputs

BIN = Path(sys.executable).parent
# One task of each output kind, single and multimodal, DICOM series, FASTA, gene counts.
TASKS = (
    "disease_classification",  # single label; X-ray, CT and MRI series, note
    "radiographic_findings_classification",  # multi-label
    "expression_prediction",  # regression; DNA + scRNA
    "protein_structure_prediction",  # per residue
    "medical_vqa",  # answer; question + image
)


def score(cohort: Path, out: Path, bundle: Path, *tasks: str, extra=(), wait=True):
    command = [str(BIN / "multimed"), "score", "--input", str(cohort), "--out", str(out)]
    command += ["--bundle", str(bundle), "--no-progress", *extra]
    for task in tasks:
        command += ["--task", task]
    if not wait:
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own session: it and its Ray are stopped together
        )
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def online(client, cohort: Path, item: str, task: str) -> tuple[list, list, str]:
    """The server's answer for the item's same inputs: (predicted, scores, bundle version)."""
    inputs = {raw.modality: raw for raw in item_inputs(cohort / item, task)}
    answer = client.predict(task, inputs)
    if answer.tokens:
        tokens = answer.tokens
        predicted, scores = [t.label for t in tokens], [[s.score for s in t.scores] for t in tokens]
    else:
        predicted, scores = list(answer.predicted), [[s.score for s in answer.scores]]
    return predicted, scores, answer.bundle_version


def test_offline_answers_equal_the_servers_and_a_bad_item_is_its_own_error(server, tmp_path):
    """Every item and task of the cohort scored as the server answers it, but one patient's
    X-ray, which is not DICOM: its tasks that send the X-ray are INVALID_ARGUMENT naming the
    modality, its other tasks OK. A bad input stays bad: the next run does not try it again."""
    cohort = tmp_path / "cohort"
    shutil.copytree(server.cohort, cohort)
    bad = server.patients[1].name
    (cohort / bad / "xray.dcm").write_bytes(b"DICM but not really" * 10)
    out = tmp_path / "results.parquet"
    said = score(cohort, out, server.bundle, *TASKS, extra=("--batch-size", "2"))
    table = pq.read_table(out).to_pylist()
    patients = [p.name for p in server.patients]
    assert sorted((r["item"], r["task"]) for r in table) == sorted(
        (p, t) for p in patients for t in TASKS
    )
    assert f"{len(patients)} items: 0 already scored, {len(patients)} scored" in said
    with server.client() as client:
        for row in table:
            sent = item_inputs(server.cohort / row["item"], row["task"])  # the good files
            if row["item"] == bad and "xray" in {raw.modality for raw in sent}:
                assert row["status"] == "INVALID_ARGUMENT", row
                assert "xray" in row["error"] and row["predicted"] is None
                continue
            assert row["status"] == "OK", row
            predicted, scores, version = online(client, cohort, row["item"], row["task"])
            assert row["predicted"] == predicted, row["task"]
            np.testing.assert_allclose(row["scores"], scores, atol=1e-4, err_msg=row["task"])
            assert row["bundle_version"] == version
    said = score(cohort, out, server.bundle, *TASKS)
    assert f"{len(patients)} already scored, 0 scored" in said


def test_stopped_run_resumes_without_repeating_or_losing_items(server, tmp_path):
    cohort = tmp_path / "cohort"
    write_cohort(cohort, 10, seed=23)
    out = tmp_path / "results.parquet"
    tasks = ("disease_classification", "protein_structure_prediction")
    run = score(
        cohort,
        out,
        server.bundle,
        *tasks,
        extra=("--batch-size", "1", "--checkpoint-every", "1"),
        wait=False,
    )
    parts = out.with_name(out.name + ".parts")
    deadline = time.monotonic() + 300
    while not list(parts.glob("part-*.parquet")) and run.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint part in 300 s"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # as a lost machine would: no clean-up
    run.wait(timeout=60)
    if not list(parts.glob("part-*.parquet")):
        pytest.fail(f"the run ended before its first checkpoint: {run.stdout.read()[-2000:]}")
    assert not out.exists()
    kept = {r["item"] for p in parts.glob("part-*.parquet") for r in pq.read_table(p).to_pylist()}
    assert 1 <= len(kept) < 10
    said = score(cohort, out, server.bundle, *tasks)
    assert f"10 items: {len(kept)} already scored, {10 - len(kept)} scored" in said
    rows = pq.read_table(out).to_pylist()
    assert sorted((r["item"], r["task"]) for r in rows) == sorted(
        (p.name, t) for p in cohort.iterdir() if p.is_dir() for t in tasks
    )
    assert all(r["status"] == "OK" for r in rows)
    assert not parts.exists(), "the parts are merged into the one file"


def test_studies_from_a_pacs_answer_as_the_server_does(server, orthanc, tmp_path):
    """`--pacs main --studies FILE`: studies read over DICOMweb as PredictStudy reads them give
    the answers the server gives for the same series; a study the PACS lacks is NOT_FOUND."""
    assert upload(orthanc, server.cohort, tmp_path).returncode == 0
    studies = {study_uid(p): p for p in server.patients}
    missing = "1.2.826.0.1.3680043.8.498.999999"
    listing = tmp_path / "studies.txt"
    listing.write_text("# one Study Instance UID a line\n" + "\n".join([*studies, missing]) + "\n")
    config = tmp_path / "serve_config.yaml"
    config.write_text(
        yaml.safe_dump({"applications": [{"args": {"pacs": {"main": orthanc.pacs_config()}}}]})
    )
    out = tmp_path / "results.parquet"
    tasks = ("bone_age_classification", "disease_classification")
    pacs = ("--pacs", "main", "--studies", str(listing), "--config", str(config))
    command = [str(BIN / "multimed"), "score", *pacs, "--out", str(out)]
    command += ["--bundle", str(server.bundle), "--no-progress"]
    done = subprocess.run(
        [*command, *(f"--task={t}" for t in tasks)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["item"], r["task"]): r for r in pq.read_table(out).to_pylist()}
    assert {rows[(missing, t)]["status"] for t in tasks} == {"NOT_FOUND"}
    with server.client() as client:
        for uid, folder in studies.items():
            for task in tasks:
                row = rows[(uid, task)]
                assert row["status"] == "OK", row
                imaging = {"xray": folder / "xray.dcm", "ct": folder / "ct", "mri": folder / "mri"}
                accepted = CATALOG.task(task).accepted
                sent = {m: read_input(m, p) for m, p in imaging.items() if m in accepted}
                assert row["used"] == [m for m in accepted if m in sent]
                answer = client.predict(task, sent)
                assert row["predicted"] == list(answer.predicted)
                np.testing.assert_allclose(
                    row["scores"], [[s.score for s in answer.scores]], atol=1e-4
                )
