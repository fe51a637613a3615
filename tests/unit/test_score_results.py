"""`multimed score`'s output without Ray: which items count as done, and the merge of
checkpoint parts into one file (one row per item and task, the latest)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multimed.cli import main
from multimed.models.cohort.writer import QUESTION_FILE, write_cohort
from multimed.services.score import SCHEMA, PacsSource, Results, item_inputs


def rows(*entries: tuple[str, str, str]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"item": i, "task": t, "status": s} for i, t, s in entries], schema=SCHEMA
    )


def test_done_means_a_final_answer_for_every_task_asked(tmp_path):
    results = Results(tmp_path / "out.parquet")
    results.checkpoint([rows(("a", "t1", "OK"), ("a", "t2", "OK"), ("b", "t1", "OK"))])
    results.checkpoint([rows(("b", "t2", "UNAVAILABLE"), ("c", "t1", "INVALID_ARGUMENT"))])
    results.checkpoint([rows(("c", "t2", "OK"))])
    # b's UNAVAILABLE is tried again; c's bad input would be bad again.
    assert results.done(["t1", "t2"]) == {"a", "c"}
    assert results.done(["t1"]) == {"a", "b", "c"}
    assert results.done(["t3"]) == set()


def test_merge_keeps_the_latest_row_per_item_and_task_and_removes_parts(tmp_path):
    out = tmp_path / "out.parquet"
    pq.write_table(rows(("a", "t1", "UNAVAILABLE"), ("b", "t1", "OK")), out)
    results = Results(out)
    results.checkpoint([rows(("a", "t1", "OK"))])
    resumed = Results(out)  # a later run finds the part left behind
    assert resumed.written == 1
    resumed.checkpoint([rows(("c", "t1", "OK"))])
    merged = resumed.merge()
    assert [(r["item"], r["status"]) for r in merged.to_pylist()] == [
        ("a", "OK"),
        ("b", "OK"),
        ("c", "OK"),
    ]
    assert pq.read_table(out).num_rows == 3
    assert not resumed.parts.exists()


def test_item_inputs_read_a_synth_cohort_as_the_online_client_would(tmp_path):
    write_cohort(tmp_path, 1, seed=3)
    patient = next(p for p in tmp_path.iterdir() if p.is_dir())
    vqa = {r.modality: r for r in item_inputs(patient, "medical_vqa")}
    assert vqa["text"].data == (patient / QUESTION_FILE).read_text()
    disease = {r.modality for r in item_inputs(patient, "disease_classification")}
    assert disease == {"xray", "ct", "mri", "text"}
    (patient / "xray.dcm").unlink()
    assert "xray" not in {r.modality for r in item_inputs(patient, "disease_classification")}


def test_a_studies_line_that_is_not_a_uid_is_refused_before_any_request():
    with pytest.raises(ValueError, match="line 2 is not a DICOM UID"):
        PacsSource("main", None, (), ["1.2.3", "../../instances"])


def test_score_needs_one_source(tmp_path, capsys):
    out = str(tmp_path / "r.parquet")
    assert main(["score", "--task", "bone_age_classification", "--out", out]) == 2
    assert "either --input DIR, or --pacs NAME with --studies FILE" in capsys.readouterr().err
    both = ["--input", str(tmp_path), "--pacs", "main"]
    assert main(["score", "--task", "bone_age_classification", "--out", out, *both]) == 2
