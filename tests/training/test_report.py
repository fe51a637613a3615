"""`multimed report --quick` through the CLI: every table and figure is written from the numbers
in results.json. Tiny budgets (80 patients, one epoch), so this checks the command and what a
one-epoch model can already show (real scans flagged, shifts raise the score), not the science:
the README's numbers come from the full run (docs/results)."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from multimed.models.catalog import CATALOG
from multimed.models.report import REAL_SCANS, SHIFTS, comparison_models
from multimed.models.report_writer import BEGIN, END, FIGURES, update_readme

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run = subprocess.run(
        [sys.executable, "-m", "multimed.cli", "report", "--out", str(out), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "report written to" in run.stdout
    return out, json.loads((out / "results.json").read_text())


def test_every_table_and_figure_is_written(report):
    out, _ = report
    text = (out / "report.md").read_text()
    for task in CATALOG.tasks:
        assert f"`{task}`" in text, task
    for model in comparison_models():
        assert f"| {model.name} |" in text, model.name
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in text, name  # and the report shows it
    assert "logistic regression" in text and "pdb_chains" in text and "pbmc68k_reduced" in text


def test_intervals_are_bootstraps_of_their_items(report):
    """Each headline accuracy's interval is about as wide as its n test items make it (the
    binomial's 3.92 standard errors; within a factor of two on these tiny splits), so it was
    drawn over the right items; each comparison reports its seeds' mean, inside an interval
    that resampling gave some width."""
    _, results = report
    for task, row in results["headline"]["metrics"]["tasks"].items():
        lo, hi = row["interval"]
        v, n = row["value"], row["n"]
        assert lo <= v <= hi, (task, row)
        if row["metric"] == "accuracy" and 0 < v < 1:
            expected = 2 * 1.96 * math.sqrt(v * (1 - v) / n)
            assert 0.5 * expected < hi - lo < 2 * expected, (task, row, expected)
    for key, row in results["comparisons"]["values"].items():
        lo, hi = row["interval"]
        assert row["mean"] == pytest.approx(sum(row["seeds"]) / len(row["seeds"]), abs=1e-4)
        assert lo < hi and lo - 1e-9 <= row["mean"] <= hi + 1e-9, (key, row)


def test_real_scans_are_flagged_and_shifts_raise_the_score(report):
    _, results = report
    ood = results["headline"]["out_of_distribution"]
    scans = ood["real_scans"]
    assert {r["file"] for r in scans} == {f for files in REAL_SCANS.values() for f in files}
    assert all(r.get("flagged") for r in scans), scans
    for modality, shifts in ood["shifted"].items():
        assert set(shifts) == set(SHIFTS)
        assert shifts["noise 0.3 sd"]["mean"] > shifts["none"]["mean"], modality


def test_the_readme_block_is_filled_from_the_report(report, tmp_path):
    out, _ = report
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\nbefore\n{BEGIN}\nold numbers\n{END}\nafter\n")
    docs = tmp_path / "docs" / "results"
    shutil.copytree(out, docs)
    update_readme(readme, docs)
    text = readme.read_text()
    assert text.startswith("# Title\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert "old numbers" not in text and "## Held-out results" in text
    for name in FIGURES:
        assert f"](docs/results/{name})" in text, name
    update_readme(readme, docs)  # again: the same text, not a second copy
    assert readme.read_text() == text
