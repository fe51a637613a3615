import json

import pytest

from multimed.cli import main
from multimed.models.catalog import CATALOG, Catalog, ModalitySpec, OutputKind, TaskSpec
from multimed.models.errors import MissingModality, UnexpectedModality, UnknownTask
from multimed.models.modalities.registry import PIPELINES


def test_catalog_has_the_ten_modalities_and_eleven_tasks():
    assert set(CATALOG.modalities) == {
        "text",
        "oct",
        "xray",
        "ct",
        "mri",
        "pathology",
        "eeg",
        "genomics",
        "scrna",
        "protein",
    }
    assert len(CATALOG.tasks) == 11
    assert set(PIPELINES) == set(CATALOG.modalities)


def test_duplicates_are_errors():
    c = Catalog()
    c.add_modality(ModalitySpec("a", "", frozenset()))
    with pytest.raises(ValueError, match="duplicate modality"):
        c.add_modality(ModalitySpec("a", "", frozenset()))
    spec = TaskSpec("t", "", OutputKind.SINGLE_LABEL, ("x",), "accuracy", all_of=("a",))
    c.add_task(spec)
    with pytest.raises(ValueError, match="duplicate task"):
        c.add_task(spec)
    with pytest.raises(ValueError, match="unknown modalities"):
        c.add_task(TaskSpec("u", "", OutputKind.SINGLE_LABEL, ("x",), "accuracy", all_of=("b",)))


def test_required_and_optional_modalities_are_checked():
    vqa = CATALOG.task("medical_vqa")
    vqa.check_modalities({"text", "ct"})
    with pytest.raises(MissingModality, match="at least one of xray, ct, mri, pathology"):
        vqa.check_modalities({"text"})
    with pytest.raises(MissingModality, match="requires text"):
        vqa.check_modalities({"xray"})
    with pytest.raises(UnexpectedModality, match="does not accept eeg"):
        vqa.check_modalities({"text", "xray", "eeg"})
    with pytest.raises(UnknownTask, match="unknown task 'nope'"):
        CATALOG.task("nope")


def test_catalog_json_command(capsys):
    assert main(["catalog", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in doc["modalities"]] == list(CATALOG.modalities)
    disease = next(t for t in doc["tasks"] if t["id"] == "disease_classification")
    assert disease["required"] == {"all_of": [], "any_of": ["xray", "ct", "mri"]}
    assert disease["optional"] == ["text"]
    assert disease["output"] == "single_label"
    assert disease["metric"] == "accuracy"
    assert len(disease["labels"]) == 4


def test_catalog_table_command(capsys):
    assert main(["catalog"]) == 0
    out = capsys.readouterr().out
    assert "protein_structure_prediction" in out and "per_token_labels" in out
