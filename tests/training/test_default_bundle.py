"""The default bundle, trained as `make run` trains it, answers the benchmark's questions.
Slow (~4 min): one training run shared by every assertion here."""

import shutil

import pytest
import torch
from pydicom.data import get_testdata_file

from multimed.client.files import read_input
from multimed.models.bundle import Bundle
from multimed.models.model import Model
from multimed.models.train import train_default


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    return train_default(tmp_path_factory.mktemp("default") / "bundle")


@pytest.fixture(scope="module")
def metrics(bundle):
    return bundle.manifest["metrics"]


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


def test_calibration_helps_on_the_test_split(metrics):
    """Temperatures fitted on validation: NLL on test never clearly worse, and ECE lower overall
    (the overconfident tasks, bone age and retinopathy, by far)."""
    rows = metrics["calibration"]
    for task, row in rows.items():
        assert row["after"]["nll"] <= row["before"]["nll"] + 0.02, (task, row)
    mean = {k: sum(r[k]["ece"] for r in rows.values()) / len(rows) for k in ("before", "after")}
    assert mean["after"] < 0.7 * mean["before"], mean


def test_ood_flag_spares_most_held_out_patients(metrics):
    """The thresholds accept 95 % of validation inputs: held-out ones are flagged about as often."""
    for modality, row in metrics["out_of_distribution"].items():
        assert row["n"] > 0 and row["flagged"] <= 0.15, (modality, row)


@pytest.mark.xfail(
    strict=True,
    reason="open (#11): the default bundle scores pydicom's CT_small 0.51 against a threshold of "
    "0.46 (flagged, but so is a fresh synthetic patient at 0.51) and MR_small 0.59 against 0.73 "
    "(not flagged). The pooled embedding of a per-image-normalised volume does not separate these "
    "real scans from the synthetic phantoms; less covariance shrinkage did not help (MR at "
    "0.81-0.88 of the threshold). The test suite's one-epoch bundle does flag both "
    "(tests/integration/test_out_of_distribution.py).",
)
def test_real_clinical_dicom_is_flagged(bundle, tmp_path):
    model = Model.from_bundle(bundle)
    for modality, name in (("ct", "CT_small.dcm"), ("mri", "MR_small.dcm")):
        series = tmp_path / modality
        series.mkdir()
        shutil.copy(get_testdata_file(name), series / name)
        pipeline = model.pipelines[modality]
        decoded = pipeline.decode(read_input(modality, series))
        batch = pipeline.collate([pipeline.preprocess(decoded)])
        with torch.no_grad():
            pooled = model.encoders[modality](batch).pooled
        [ood] = model.task_models.out_of_distribution(modality, pooled)
        assert ood.flagged, (modality, ood)
