"""`multimed watch`: follow a PACS's new stable studies and answer each once through a running
server's PredictStudy (SR stored into the study, FHIR bundle sent by the server).

New studies come from Orthanc's changes feed (StableStudy events) when the PACS config names
Orthanc's REST API (`orthanc_url`), else from QIDO-RS polling of today's studies, a study being
stable once its instance count has not changed for `stable_s`. State lives in a small SQLite
file: the feed's position and each study's outcome, so that each study is answered exactly once
across restarts; a failure is retried with backoff and listed by `--status`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from multimed.services.errors import PacsUnavailable
from multimed.services.frontends.hospital.pacs import Pacs, study_date_today

BACKOFF_S = 5.0  # first retry after a failure; doubled each time
MAX_BACKOFF_S = 600.0
MAX_ATTEMPTS = 8  # then the study stays failed until the operator retries it (--retry)
DONE, PENDING, FAILED = "done", "pending", "failed"
# Answers about the study itself (nothing usable, gone): trying again would give the same.
FINAL = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    pacs TEXT NOT NULL, study_uid TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '', updated TEXT NOT NULL,
    PRIMARY KEY (pacs, study_uid));
CREATE TABLE IF NOT EXISTS cursor (pacs TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class State:
    """The watcher's SQLite file: every study seen, its state, and each PACS's feed cursor."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit; BEGIN where needed
        self.db.executescript(_SCHEMA)

    def cursor(self, pacs: str) -> str | None:
        row = self.db.execute("SELECT value FROM cursor WHERE pacs = ?", (pacs,)).fetchone()
        return None if row is None else row[0]

    def add(self, pacs: str, studies: Iterable[str], cursor: str) -> None:
        """New studies as pending, and the feed position after them, in one transaction: a
        crash loses neither."""
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT OR IGNORE INTO studies (pacs, study_uid, state, updated) VALUES (?, ?, ?, ?)",
            [(pacs, s, PENDING, _now()) for s in studies],
        )
        self.db.execute("INSERT OR REPLACE INTO cursor VALUES (?, ?)", (pacs, cursor))
        self.db.execute("COMMIT")

    def due(self, pacs: str) -> list[str]:
        rows = self.db.execute(
            "SELECT study_uid FROM studies WHERE pacs = ? AND state = ? AND next_try <= ? "
            "ORDER BY rowid",
            (pacs, PENDING, time.time()),
        )
        return [r[0] for r in rows]

    def finish(self, pacs: str, study: str) -> None:
        self.db.execute(
            "UPDATE studies SET state = ?, last_error = '', updated = ? "
            "WHERE pacs = ? AND study_uid = ?",
            (DONE, _now(), pacs, study),
        )

    def fail(self, pacs: str, study: str, error: str, final: bool = False) -> int:
        """Record a failure; -> the attempts so far. Retried with backoff until MAX_ATTEMPTS,
        unless `final` (the study itself cannot be answered)."""
        (attempts,) = self.db.execute(
            "SELECT attempts FROM studies WHERE pacs = ? AND study_uid = ?", (pacs, study)
        ).fetchone()
        attempts += 1
        state = FAILED if final or attempts >= MAX_ATTEMPTS else PENDING
        wait = min(BACKOFF_S * 2 ** (attempts - 1), MAX_BACKOFF_S)
        self.db.execute(
            "UPDATE studies SET state = ?, attempts = ?, next_try = ?, last_error = ?, "
            "updated = ? WHERE pacs = ? AND study_uid = ?",
            (state, attempts, time.time() + wait, error, _now(), pacs, study),
        )
        return attempts

    def retry_failed(self, pacs: str) -> int:
        return self.db.execute(
            "UPDATE studies SET state = ?, attempts = 0, next_try = 0 WHERE pacs = ? AND state = ?",
            (PENDING, pacs, FAILED),
        ).rowcount

    def rows(self, pacs: str) -> list[tuple[str, str, int, str, str]]:
        return self.db.execute(
            "SELECT study_uid, state, attempts, last_error, updated FROM studies WHERE pacs = ? "
            "ORDER BY rowid",
            (pacs,),
        ).fetchall()

    def close(self) -> None:
        self.db.close()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- where new studies come from: one strategy per kind of PACS ---


class OrthancChanges:
    """Orthanc's changes feed: StableStudy events after the saved sequence number. A first run
    starts at the feed's end: the watcher follows new studies, not the archive."""

    def __init__(self, pacs: Pacs, rest_url: str):
        self.pacs, self.url = pacs, rest_url.rstrip("/")

    def _get(self, path: str, **params) -> dict:
        with self.pacs.asking("reading the changes feed"):
            r = self.pacs.session.get(
                f"{self.url}{path}", params=params, timeout=self.pacs.settings.timeout_s
            )
            r.raise_for_status()
            return r.json()  # a body that is not JSON raises a RequestException subclass

    def poll(self, cursor: str | None) -> tuple[list[str], str]:
        if cursor is None:
            return [], str(self._get("/changes", last="")["Last"])
        studies, seq = [], int(cursor)
        while True:
            page = self._get("/changes", since=seq, limit=100)
            for change in page["Changes"]:
                if change["ChangeType"] == "StableStudy":
                    tags = self._get(f"/studies/{change['ID']}")["MainDicomTags"]
                    studies.append(tags["StudyInstanceUID"])
            seq = int(page["Last"])
            if page["Done"]:
                return studies, str(seq)


class QidoPolling:
    """Any DICOMweb PACS: today's studies by QIDO-RS; a study is stable once its instance count
    has not changed for `stable_s`. The cursor holds the counts seen and since when."""

    def __init__(self, pacs: Pacs, stable_s: float):
        self.pacs, self.stable_s = pacs, stable_s

    def poll(self, cursor: str | None) -> tuple[list[str], str]:
        seen: dict[str, list] = json.loads(cursor) if cursor else {}
        counts = self.pacs.studies_on(study_date_today())
        now, stable = time.time(), []
        for uid, count in counts.items():
            previous = seen.get(uid)
            if previous is None or previous[0] != count:
                seen[uid] = [count, now, False]
            elif not previous[2] and now - previous[1] >= self.stable_s:
                previous[2] = True
                stable.append(uid)
        if cursor is None:  # a first run marks today's studies as seen, not new
            stable = []
            for entry in seen.values():
                entry[2] = True
        return stable, json.dumps({u: v for u, v in seen.items() if u in counts})


class Incomplete(Exception):
    """A study answered, but its SR was not stored or its FHIR bundle not sent: retried."""


@dataclass
class Watcher:
    """Answers each new stable study once: `predict(study_uid)` -> a one-line summary, raising
    on failure. `stopping` (set by Ctrl-C) is read between studies: the study in hand ends."""

    pacs: str
    source: OrthancChanges | QidoPolling
    state: State
    predict: Callable[[str], str]
    say: Callable[[str], None]
    poll_s: float = 2.0
    stopping: bool = False

    def step(self) -> int:
        """One round: new studies from the feed, then every study due. -> studies handled."""
        studies, cursor = self.source.poll(self.state.cursor(self.pacs))
        self.state.add(self.pacs, studies, cursor)
        handled = 0
        for study in self.state.due(self.pacs):
            if self.stopping:
                break
            started = time.perf_counter()
            try:
                summary = self.predict(study)
            except (grpc.RpcError, OSError, Incomplete) as e:
                rpc = isinstance(e, grpc.RpcError)
                message = f"{e.code().name}: {e.details()}" if rpc else str(e)
                final = rpc and e.code() in FINAL
                attempts = self.state.fail(self.pacs, study, message, final)
                again = "" if final else f" (attempt {attempts})"
                self.say(f"{study}  FAILED{again}: {message}")
            else:
                self.state.finish(self.pacs, study)
                self.say(f"{study}  {summary}  ({time.perf_counter() - started:.1f} s)")
            handled += 1
        return handled

    def run(self) -> None:
        while not self.stopping:
            try:
                self.step()
            except PacsUnavailable as e:  # the PACS's feed unreachable: try again next round
                self.say(f"feed: {e}")
            waited = 0.0
            while waited < self.poll_s and not self.stopping:
                time.sleep(0.1)
                waited += 0.1


def summary(response) -> str:
    """A study's answer in one line: each task's prediction, then the SR and FHIR outcomes.
    Raises Incomplete when the SR was not stored or the bundle not sent."""
    if response.HasField("sr") and not response.sr.stored:
        raise Incomplete(f"SR not stored: {response.sr.message}")
    if response.HasField("fhir") and not response.fhir.sent:
        raise Incomplete(f"FHIR bundle not sent: {response.fhir.message}")
    answers = ", ".join(
        f"{a.prediction.task}={'/'.join(a.prediction.predicted) or '-'}" for a in response.answers
    )
    done = ["SR stored"] if response.HasField("sr") else []
    done += ["FHIR sent"] if response.HasField("fhir") else []
    return "  ".join([answers, *done])
