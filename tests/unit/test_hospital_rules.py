"""The hospital door's pure parts: series routing and its rules, the PACS and FHIR settings,
and the watcher's state (exactly once, backoff, failed studies)."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from multimed.services.config import AppArgs, PacsSettings, SeriesRule
from multimed.services.frontends.hospital import watch
from multimed.services.frontends.hospital.findings import SeriesRef
from multimed.services.frontends.hospital.pacs import Pacs
from multimed.services.frontends.hospital.routing import route


def series(code: str, description: str = "", body_part: str = "") -> SeriesRef:
    return SeriesRef("1.2.3", code, 1, description, 1, body_part)


@pytest.mark.parametrize(
    ("code", "modality"),
    [
        ("DX", "xray"),
        ("CR", "xray"),
        ("CT", "ct"),
        ("MR", "mri"),
        ("OPT", "oct"),
        ("SM", "pathology"),
    ],
)
def test_default_routes_by_dicom_modality(code, modality):
    assert route(series(code)).modality == modality


def test_unknown_modality_is_ignored_with_reason():
    r = route(series("SR"))
    assert r.modality == "" and r.reason == "DICOM modality SR is not an input of any task"


def test_rules_come_first_and_every_field_must_match():
    rules = [
        SeriesRule(modality="ignore", description="scout|localizer"),
        SeriesRule(modality="xray", dicom_modality=["OT"], body_part=["chest"]),
    ]
    assert route(series("CT", "Scout 1"), rules).reason == "left out by a series rule"
    assert route(series("CT", "Axial 1 mm"), rules).modality == "ct"
    assert route(series("OT", body_part="CHEST"), rules).modality == "xray"
    assert route(series("OT", body_part="HEAD"), rules).modality == ""


def test_settings_are_checked():
    with pytest.raises(ValidationError, match="unknown modality 'lung'"):
        SeriesRule(modality="lung")
    with pytest.raises(ValidationError, match="not a regular expression"):
        SeriesRule(modality="ct", description="(")
    with pytest.raises(ValidationError, match="username and password_file go together"):
        PacsSettings(url="http://pacs/dicom-web", username="u")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AppArgs.model_validate({"pacs": {"main": {"url": "http://p", "pasword_file": "x"}}})


def test_hospital_settings_make_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = AppArgs.model_validate(
        {
            "pacs": {"main": {"url": "http://p", "username": "u", "password_file": "pw"}},
            "fhir": {"url": "http://f", "token_file": "tok"},
        }
    )
    hospital = args.hospital()
    assert hospital.pacs["main"].password_file == str(tmp_path / "pw")
    assert hospital.fhir.token_file == str(tmp_path / "tok")


def test_state_answers_a_study_once(tmp_path):
    state = watch.State(tmp_path / "w.sqlite")
    state.add("main", ["s1", "s2"], "10")
    assert state.due("main") == ["s1", "s2"] and state.cursor("main") == "10"
    state.finish("main", "s1")
    state.add("main", ["s1"], "11")  # seen again (its SR made it change): stays done
    assert state.due("main") == ["s2"] and state.cursor("main") == "11"
    state.close()
    again = watch.State(tmp_path / "w.sqlite")  # a restart keeps it all
    assert again.due("main") == ["s2"] and again.cursor("main") == "11"


def test_state_backs_off_then_gives_up_until_retried(tmp_path, monkeypatch):
    state = watch.State(tmp_path / "w.sqlite")
    state.add("main", ["s1"], "1")
    assert state.fail("main", "s1", "UNAVAILABLE: PACS 'main' failed") == 1
    assert state.due("main") == []  # waits BACKOFF_S first
    monkeypatch.setattr(watch, "MAX_ATTEMPTS", 2)
    state.fail("main", "s1", "again")
    (row,) = state.rows("main")
    assert row[:4] == ("s1", watch.FAILED, 2, "again")
    assert state.retry_failed("main") == 1 and state.due("main") == ["s1"]


def test_a_final_failure_is_not_retried(tmp_path):
    state = watch.State(tmp_path / "w.sqlite")
    state.add("main", ["s1"], "1")
    state.fail("main", "s1", "FAILED_PRECONDITION: it holds US", final=True)
    assert state.rows("main")[0][1] == watch.FAILED and state.due("main") == []


def test_watcher_outlives_an_unreachable_feed(tmp_path):
    """The PACS's changes feed down (nothing listens on its port): the watcher says so and
    carries on polling, instead of dying."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pacs = Pacs("main", PacsSettings(url=f"http://127.0.0.1:{port}/dicom-web", timeout_s=2))
    said: list[str] = []
    watcher = watch.Watcher(
        "main",
        watch.OrthancChanges(pacs, f"http://127.0.0.1:{port}"),
        watch.State(tmp_path / "w.sqlite"),
        predict=lambda study: "",
        say=print,  # replaced below, once the watcher exists
        poll_s=0.1,
    )

    def say(line: str) -> None:
        said.append(line)
        watcher.stopping = len(said) >= 2  # two rounds: it went on after the first failure

    watcher.say = say
    watcher.run()
    assert said == ["feed: PACS 'main' failed (ConnectionError) while reading the changes feed"] * 2
