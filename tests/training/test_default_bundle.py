"""The default bundle, trained as `make run` trains it, answers the benchmark's questions.
Slow (~4 min): one training run shared by every assertion here."""

import pytest

from multimed.models.train import train_default


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    return train_default(tmp_path_factory.mktemp("default") / "bundle").manifest["metrics"]


def test_every_task_beats_its_baseline_clearly(metrics):
    for task, row in metrics["tasks"].items():
        assert row["value"] >= row["baseline"] + 0.1, (task, row)
    real = metrics["real_data"]["pbmc68k_reduced"]["cell_type_classification"]
    assert real["value"] >= real["baseline"] + 0.3


def test_fusing_imaging_beats_the_best_single_modality(metrics):
    rows = metrics["ablations"]["disease_classification"]
    fused = rows["without:text"]  # x-ray + CT + MRI
    best_single = max(rows["only:xray"], rows["only:ct"], rows["only:mri"])
    assert fused > best_single + 0.03, rows


def test_vqa_needs_question_and_image(metrics):
    both = metrics["tasks"]["medical_vqa"]["value"]
    rows = metrics["ablations"]["medical_vqa"]
    assert both > rows["only:text"] + 0.15, rows  # question only
    assert both > rows["without:text"] + 0.15, rows  # image only
