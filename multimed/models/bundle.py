"""Model bundles: a directory of safetensors weights plus `manifest.json`, whose own sha256 sits
in `manifest.sha256`. Loading verifies every hash and never unpickles."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from multimed.models.catalog import CATALOG, CATALOG_VERSION
from multimed.models.config import ModelConfig
from multimed.models.errors import BundleError

# 2: calibration temperatures and OOD statistics in tasks.safetensors; 3: the OOD score also
# reads each encoder's descriptor (its statistics are sized by it)
BUNDLE_FORMAT = 3
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
TASKS_FILE = "tasks.safetensors"


def encoder_file(modality: str) -> str:
    return f"encoders/{modality}.safetensors"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: ModelConfig

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def encoder_state(self, modality: str) -> dict[str, Tensor]:
        return self._load(encoder_file(modality))

    def tasks_state(self) -> dict[str, Tensor]:
        return self._load(TASKS_FILE)

    def _load(self, name: str) -> dict[str, Tensor]:
        try:
            return load_file(self.path / name)
        except (SafetensorError, OSError) as e:
            raise BundleError(f"bundle {self.path}: cannot read {name}: {e}") from None


def save_bundle(
    path: Path,
    config: ModelConfig,
    encoders: dict[str, dict[str, Tensor]],
    tasks: dict[str, Tensor],
    info: dict[str, Any],
    name: str = "multimed",
) -> Bundle:
    """Write weights, then the manifest naming each file's sha256; the version is derived from
    the weights, so identical training gives an identical version."""
    path.mkdir(parents=True, exist_ok=True)
    files = {encoder_file(m): state for m, state in encoders.items()} | {TASKS_FILE: tasks}
    for rel, state in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, path / rel)
    hashes = {rel: sha256(path / rel) for rel in sorted(files)}
    weights_digest = hashlib.sha256("".join(hashes.values()).encode()).hexdigest()[:12]
    manifest = {
        "bundle_format": BUNDLE_FORMAT,
        "name": name,
        "version": f"{name}-{weights_digest}",
        "created_unix": int(time.time()),
        "catalog_version": CATALOG_VERSION,
        "config": config.model_dump(mode="json"),
        "files": hashes,
        **info,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (path / MANIFEST).write_text(text)
    (path / MANIFEST_DIGEST).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")
    return load_bundle(path)


def load_bundle(path: str | Path) -> Bundle:
    """Verify and open a bundle; any missing, extra-tampered or corrupt file is refused by name."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"bundle {path}: {MANIFEST} not found (is this a bundle directory?)")
    digest_path = path / MANIFEST_DIGEST
    if not digest_path.is_file():
        raise BundleError(f"bundle {path}: {MANIFEST_DIGEST} not found (incomplete bundle)")
    if sha256(manifest_path) != digest_path.read_text().strip():
        raise BundleError(
            f"bundle {path}: {MANIFEST} does not match {MANIFEST_DIGEST} (tampered or corrupt)"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("bundle_format") != BUNDLE_FORMAT:
        raise BundleError(
            f"bundle {path}: unsupported bundle_format {manifest.get('bundle_format')} (this "
            f"server reads {BUNDLE_FORMAT}; train it again with `multimed train`)"
        )
    if manifest.get("catalog_version") != CATALOG_VERSION:
        raise BundleError(
            f"bundle {path}: trained for catalog version {manifest.get('catalog_version')}, "
            f"this server has {CATALOG_VERSION}"
        )
    required = {encoder_file(m) for m in CATALOG.modalities} | {TASKS_FILE}
    unlisted = sorted(required - set(manifest["files"]))
    if unlisted:
        raise BundleError(f"bundle {path}: manifest lists no {', '.join(unlisted)} (incomplete)")
    for rel, expected in manifest["files"].items():
        file = path / rel
        if not file.is_file():
            raise BundleError(f"bundle {path}: {rel} is missing (incomplete bundle)")
        if sha256(file) != expected:
            raise BundleError(f"bundle {path}: {rel} fails its sha256 check (tampered or corrupt)")
    config = ModelConfig.model_validate(manifest["config"])
    return Bundle(path, manifest, config)
