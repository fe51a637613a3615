"""The audit log: one JSON line per call, with who asked for what and how it ended. Never a
payload or a patient identifier: request ids are the client's, so they are bounded and stripped
to printable ASCII; tasks and modalities outside the catalog are written as "unknown"."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from multimed.models.catalog import CATALOG
from multimed.services.triton import encoder_model

log = logging.getLogger("multimed.audit")
MAX_ID = 128
# What a call can be about: a task, an encoder (the Open Inference Protocol's encoder_<modality>
# models), or nothing named (Embed).
TASK_LABELS = frozenset({"", *CATALOG.tasks, *(encoder_model(m) for m in CATALOG.modalities)})


def loggable(value: str, limit: int = MAX_ID) -> str:
    """A client-chosen string, safe to write: printable ASCII, at most `limit` characters."""
    return "".join(c for c in value[:limit] if c.isascii() and c.isprintable())


def task_label(task: str) -> str:
    """A requested task (or model) as a label: unknown names collapse, so a client cannot write
    arbitrary text into logs nor grow a metric's label set without bound."""
    return task if task in TASK_LABELS else "unknown"


def modality_label(modality: str) -> str:
    return modality if modality in CATALOG.modalities else "unknown"


def modality_labels(modalities: Iterable[str]) -> list[str]:
    return sorted({modality_label(m) for m in modalities})


class AuditLog:
    """Writes through the `multimed.audit` logger; with `path`, also appends to that file."""

    def __init__(self, path: str | None = None):
        log.setLevel(logging.INFO)
        self.file = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = logging.FileHandler(path, encoding="utf-8")
            self.file.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(self.file)

    def record(
        self,
        *,
        request_id: str,
        caller: str,
        method: str,
        task: str,
        modalities: Iterable[str],
        code: str,
        latency_ms: float,
    ) -> None:
        log.info(
            json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "request_id": loggable(request_id),
                    "caller": loggable(caller, 256),
                    "method": method,
                    "task": task_label(task),
                    "modalities": modality_labels(modalities),
                    "code": code,
                    "latency_ms": round(latency_ms, 2),
                }
            )
        )

    def close(self) -> None:
        if self.file is not None:
            log.removeHandler(self.file)
            self.file.close()
