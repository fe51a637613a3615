"""`multimed watch` against the real Orthanc: two studies uploaded, one before and one during a
restart of the watcher, are each answered exactly once (one SR in each study, one FHIR bundle
each), although storing the SR makes each study change, and turn stable, again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from test_hospital import dicomweb

WAIT_S = 90


def new_study(orthanc, patient: Path, study_date: str | None = None) -> str:
    """The patient's X-ray and CT stored again as a new study (new UIDs)."""
    study, series, datasets = generate_uid(), {}, []
    for path in [patient / "xray.dcm", *sorted((patient / "ct").iterdir())]:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(ds.Modality, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate = study_date or ds.StudyDate
        datasets.append(ds)
    assert not dicomweb(orthanc).store_instances(datasets).get("FailedSOPSequence")
    return study


class Watch:
    """`multimed watch` in a subprocess, its output in a file; stopped with Ctrl-C (SIGINT)."""

    def __init__(self, server, work: Path, config: Path, state: Path):
        self.out = work / f"watch-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "multimed.cli", "watch", "--pacs", "main"]
        command += ["--config", str(config), "--state", str(state), "--url", server.url]
        command += ["--task", "disease_classification"]
        env = {**os.environ, "MULTIMED_TOKEN": server.token, "PYTHONUNBUFFERED": "1"}
        with self.out.open("w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.wait_for("watching PACS main")

    def text(self) -> str:
        return self.out.read_text()

    def wait_for(self, needle: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while needle not in self.text():
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, f"no {needle!r} in:\n{self.text()}"
            time.sleep(0.2)

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        try:
            assert self.process.wait(timeout=WAIT_S) == 0, self.text()
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.text()


@pytest.fixture
def watch_config(orthanc, tmp_path) -> Path:
    pacs = {**orthanc.pacs_config(), "orthanc_url": orthanc.url}
    config = tmp_path / "watch_config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"args": {"pacs": {"main": pacs}}}]}))
    return config


def test_watch_answers_each_study_once_across_a_restart(
    server, orthanc, fhir, watch_config, tmp_path
):
    receiver, _ = fhir
    state = tmp_path / "watch.sqlite"
    first = Watch(server, tmp_path, watch_config, state)
    a = new_study(orthanc, server.patients[1])
    first.wait_for(f"{a}  disease_classification=")
    before = first.stop()
    b = new_study(orthanc, server.patients[2])  # arrives while no watcher runs
    second = Watch(server, tmp_path, watch_config, state)
    second.wait_for(f"{b}  disease_classification=")
    time.sleep(6)  # A's and B's SRs make them stable again (StableAge 2 s): not answered again
    after = second.stop()
    lines = (before + after).splitlines()
    for study in (a, b):
        assert sum(line.startswith(study) for line in lines) == 1, lines
        assert "SR stored  FHIR sent" in next(line for line in lines if line.startswith(study))
        srs = dicomweb(orthanc).search_for_series(study, search_filters={"Modality": "SR"})
        assert len(srs) == 1
        sent = [b for b in receiver.bundles() if study in str(b)]
        assert len(sent) == 1
    command = [sys.executable, "-m", "multimed.cli", "watch", "--pacs", "main", "--status"]
    command += ["--config", str(watch_config), "--state", str(state)]
    status = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Studies the other tests stored also turned stable meanwhile: each is listed too.
    rows = {line.split()[3]: line.split()[1] for line in status.stdout.splitlines()}
    assert rows[a] == rows[b] == "done"


def test_qido_polling_finds_a_new_study_once_it_is_stable(server, orthanc):
    """Any DICOMweb PACS (no changes feed): today's studies by QIDO-RS, each reported once
    its instance count has stayed the same for stable_s."""
    from multimed.services.config import PacsSettings
    from multimed.services.frontends.hospital.pacs import Pacs, study_date_today
    from multimed.services.frontends.hospital.watch import QidoPolling

    source = QidoPolling(Pacs("main", PacsSettings(**orthanc.pacs_config())), stable_s=1.0)
    found, cursor = source.poll(None)  # a first poll marks what is there as seen
    assert found == []
    study = new_study(orthanc, server.patients[0], study_date=study_date_today())
    found, cursor = source.poll(cursor)
    assert found == []  # just seen: not yet stable
    time.sleep(1.2)
    found, cursor = source.poll(cursor)
    assert found == [study]
    assert source.poll(cursor)[0] == []  # reported once
