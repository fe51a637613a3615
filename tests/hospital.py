"""A real PACS and a FHIR endpoint for the server tiers: Orthanc with its DICOMweb plugin
(Debian's `orthanc`, `orthanc-dicomweb`) on a free port with a temporary storage folder and
authentication on, stopped by pid; and a small FHIR receiver that records what is POSTed.

Orthanc 1.10 cannot bind one address (HttpBindAddresses came in 1.12.10): it listens on every
interface, refuses remote clients (RemoteAccessAllowed false) and asks every client for a
password."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import yaml
from servers import free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
START_TIMEOUT_S = 30
# A study with this accession number gets its SRs refused (the PACS's failed-SOP answer), as a
# PACS with a storage rule would.
REFUSE_SR_ACCESSION = "REFUSE-SR"
_REFUSE_SR = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  return not (dicom.Modality == "SR" and dicom.AccessionNumber == "{REFUSE_SR_ACCESSION}")
end
"""


@dataclass(frozen=True)
class Orthanc:
    url: str  # REST API base
    username: str
    password: str
    password_file: Path
    process: subprocess.Popen

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str):
        """Orthanc's REST API, authenticated: the decoded JSON answer."""
        request = urllib.request.Request(f"{self.url}{path}", headers=self._auth())
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def _auth(self) -> dict[str, str]:
        pair = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}

    def pacs_config(self, timeout_s: float = 30) -> dict:
        """This PACS as an `args.pacs` entry of the serve config."""
        return {
            "url": self.dicomweb,
            "username": self.username,
            "password_file": str(self.password_file),
            "timeout_s": timeout_s,
        }


@contextmanager
def running_orthanc(work: Path, stable_age_s: int = 2):
    """Orthanc on a free port, its storage under `work`, until the block ends."""
    work.mkdir(parents=True, exist_ok=True)
    port, password = free_port(), secrets.token_urlsafe(16)
    password_file = work / "orthanc-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    config = {
        "Name": "multimed-test",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,  # DICOMweb only: no DIMSE port
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"multimed": password},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": stable_age_s,  # seconds without a new instance before a study is stable
    }
    lua = work / "refuse-sr.lua"
    lua.write_text(_REFUSE_SR)
    config["LuaScripts"] = [str(lua)]
    config_file = work / "orthanc.json"
    config_file.write_text(json.dumps(config))
    config_file.chmod(0o600)
    log = work / "orthanc.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [ORTHANC, str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    orthanc = Orthanc(f"http://127.0.0.1:{port}", "multimed", password, password_file, process)
    try:
        _wait_up(orthanc, log)
        yield orthanc
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_up(orthanc: Orthanc, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if orthanc.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {log.read_text()[-2000:]}")
        try:
            orthanc.get("/system")
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"Orthanc not up in {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@dataclass
class FhirReceiver:
    """A FHIR endpoint stand-in (no FHIR server is packaged here): it records each POSTed
    body and its Authorization header, and answers 503 to the next `fail_next` POSTs."""

    url: str = ""
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    received: list[tuple[str, dict]] = field(default_factory=list)
    fail_next: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bundles(self) -> list[dict]:
        with self.lock:
            return [body for _, body in self.received]


@contextmanager
def fhir_receiver(work: Path):
    receiver = FhirReceiver()
    token_file = work / "fhir-token"
    token_file.write_text(receiver.token + "\n")
    token_file.chmod(0o600)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with receiver.lock:
                failing = receiver.fail_next > 0
                receiver.fail_next -= failing
                if not failing:
                    receiver.received.append(
                        (self.headers.get("Authorization", ""), json.loads(body))
                    )
            self.send_response(503 if failing else 200)
            self.send_header("Content-Type", "application/fhir+json")
            self.end_headers()
            self.wfile.write(b'{"resourceType": "Bundle", "type": "transaction-response"}')

        def log_message(self, *args):  # the test's output stays quiet
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{http.server_address[1]}/fhir"
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, token_file
    finally:
        http.shutdown()
        http.server_close()


def study_uid(folder: Path) -> str:
    return str(pydicom.dcmread(folder / "xray.dcm").StudyInstanceUID)


def upload(orthanc, folder: Path, work: Path) -> subprocess.CompletedProcess:
    """`multimed pacs upload` as an operator runs it, the PACS named in a serve config."""
    config = work / "pacs_config.yaml"
    config.write_text(
        yaml.safe_dump({"applications": [{"args": {"pacs": {"main": orthanc.pacs_config()}}}]})
    )
    command = [sys.executable, "-m", "multimed.cli", "pacs", "upload", str(folder)]
    command += ["--pacs", "main", "--config", str(config), "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)
