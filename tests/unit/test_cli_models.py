"""The models-layer commands end to end: synth -> files that decode; train -> bundle -> evaluate."""

import json
from pathlib import Path

import pytest

from multimed.cli import main
from multimed.client.files import read_input
from multimed.models.catalog import CATALOG
from multimed.models.cohort.writer import FILES, QUESTION_FILE
from multimed.models.config import ModelConfig
from multimed.models.modalities.registry import build_pipeline


def test_synth_writes_real_formats_that_decode(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["synth", "--out", str(out), "--n", "2", "--seed", "3"]) == 0
    labels = json.loads((out / "labels.json").read_text())
    assert len(labels) == 2
    patient_id, patient_labels = next(iter(labels.items()))
    assert set(CATALOG.tasks) <= set(patient_labels)
    folder = out / patient_id
    assert (folder / "xray.dcm").read_bytes()[128:132] == b"DICM"
    assert (folder / "eeg.edf").read_bytes()[:8] == b"0       "
    assert (folder / "genomics.fasta").read_text().startswith(">")
    assert len(list((folder / "ct").glob("*.dcm"))) == 16
    assert (folder / QUESTION_FILE).read_text().endswith("?")
    config = ModelConfig()
    for modality, name in FILES.items():
        item = build_pipeline(modality, config).prepare(read_input(modality, folder / name))
        assert item, modality


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    args = [
        "train",
        "--out",
        str(out),
        "--patients",
        "40",
        "--epochs",
        "1",
        "--tasks",
        "disease_classification",
        "medical_vqa",
        "cell_type_classification",
    ]
    assert main(args) == 0
    return out


def test_train_then_evaluate_json(small_bundle, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--bundle", str(small_bundle), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["tasks"]) == {
        "disease_classification",
        "medical_vqa",
        "cell_type_classification",
    }
    for row in doc["tasks"].values():
        assert set(row) >= {"metric", "value", "baseline"}
    assert "only:xray" in doc["ablations"]["disease_classification"]
    assert "cell_type_classification" in doc["real_data"]["pbmc68k_reduced"]
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    assert manifest["metrics"]["tasks"] == doc["tasks"]  # the bundle's own numbers reproduce


def test_tampered_bundle_is_refused_by_the_cli(small_bundle, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in small_bundle.rglob("*"):
        if f.is_file():
            target = copy / f.relative_to(small_bundle)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    victim = copy / "encoders" / "mri.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["evaluate", "--bundle", str(copy)]) == 2
    assert "encoders/mri.safetensors fails its sha256 check" in capsys.readouterr().err
