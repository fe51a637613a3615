"""The server tiers' small bundle: 60 synthetic patients, one epoch, no real data. It proves the
serving path, not the science (tests/training does that). `make test-bundle` trains it once
into artifacts/test-bundle (again when the model code changes) and the integration and system
tiers read it from MULTIMED_TEST_BUNDLE; without that variable a tier trains its own."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from multimed.models.config import ModelConfig
from multimed.models.train import TrainSettings, train

SETTINGS = TrainSettings(patients=60, epochs=1, real_data=False)


def small_bundle(out: Path) -> Path:
    train(out, SETTINGS, ModelConfig())
    return out


def shared_bundle() -> Path | None:
    """The bundle `make test-bundle` trained, when the environment names one."""
    path = os.environ.get("MULTIMED_TEST_BUNDLE")
    if not path:
        return None
    if not (Path(path) / "manifest.json").is_file():
        raise RuntimeError(f"MULTIMED_TEST_BUNDLE={path} holds no bundle: run make test-bundle")
    return Path(path)


if __name__ == "__main__":
    small_bundle(Path(sys.argv[1]))
