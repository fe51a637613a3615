import json

import pytest
import torch

from multimed.models.bundle import MANIFEST, encoder_file, load_bundle, save_bundle
from multimed.models.catalog import CATALOG
from multimed.models.config import ModelConfig
from multimed.models.errors import BundleError
from multimed.models.tasks import TaskModels


@pytest.fixture
def bundle(tmp_path):
    config = ModelConfig(embed_dim=8)
    encoders = {m: {"w": torch.full((2, 2), float(i))} for i, m in enumerate(CATALOG.modalities)}
    return save_bundle(
        tmp_path / "b",
        config,
        encoders,
        TaskModels(config).state_dict(),
        {"training": {"data": "test"}},
    )


def test_round_trip_and_deterministic_version(bundle, tmp_path):
    loaded = load_bundle(bundle.path)
    assert loaded.config == ModelConfig(embed_dim=8)
    assert torch.equal(loaded.encoder_state("ct")["w"], torch.full((2, 2), 3.0))
    TaskModels(loaded.config).load_state_dict(loaded.tasks_state())
    assert loaded.version.startswith("multimed-")
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    assert set(manifest["files"]) >= {encoder_file(m) for m in CATALOG.modalities}


@pytest.mark.parametrize(
    "victim", [encoder_file("xray"), "tasks.safetensors", MANIFEST, "manifest.sha256"]
)
def test_one_changed_byte_is_refused_naming_the_file(bundle, victim):
    path = bundle.path / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    name = MANIFEST if victim == "manifest.sha256" else victim
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        load_bundle(bundle.path)


def test_missing_file_is_refused(bundle):
    (bundle.path / encoder_file("eeg")).unlink()
    with pytest.raises(BundleError, match=r"encoders/eeg\.safetensors is missing"):
        load_bundle(bundle.path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"manifest\.json not found"):
        load_bundle(tmp_path)
