"""Out-of-distribution flags through the real server: real clinical DICOM (pydicom's CT and MR)
sent to models trained on the synthetic cohort are flagged; the cohort's own patients (drawn
fresh from the generator) score below them, and below themselves shifted (more noise, other
intensities). Every protocol carries the flag."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as triton
from pydicom.data import get_testdata_file
from servers import TOKEN

from multimed.client.files import read_input
from multimed.models.catalog import CATALOG
from multimed.models.cohort.synthetic import generate_cohort
from multimed.models.cohort.writer import FILES
from multimed.models.report import SHIFTS

TASKS = {"ct": "disease_classification", "mri": "brain_tumor_classification"}
REAL = {"ct": "CT_small.dcm", "mri": "MR_small.dcm"}


@pytest.fixture(scope="module")
def real_series(tmp_path_factory):
    """Each real file as a one-file series folder (the volume modalities take a series)."""
    out = {}
    for modality, name in REAL.items():
        folder = tmp_path_factory.mktemp(modality)
        shutil.copy(get_testdata_file(name), folder / name)
        out[modality] = folder
    return out


@pytest.mark.parametrize("modality", list(TASKS))
def test_real_dicom_is_flagged_and_the_cohort_scores_lower(server, client, real_series, modality):
    task = TASKS[modality]
    real = client.predict(task, {modality: real_series[modality]}).out_of_distribution[modality]
    cohort = [
        client.predict(task, {modality: p / modality}).out_of_distribution[modality]
        for p in server.patients
    ]
    print(
        f"{modality}: real {real.score:.2f}, cohort {[round(c.score, 2) for c in cohort]}, "
        f"threshold {real.threshold:.2f}"
    )
    assert np.isfinite(real.threshold) and real.threshold > 0
    assert real.flagged
    assert real.score > max(c.score for c in cohort)


@pytest.mark.parametrize(
    ("modality", "shift"),
    [("ct", "noise 0.3 sd"), ("ct", "intensity x1.5"), ("mri", "noise 0.3 sd")],
)
def test_shifted_scans_score_higher_than_the_cohorts_own(client, tmp_path, modality, shift):
    """Fresh synthetic patients sent as tensors, as drawn and shifted as the report shifts them
    (MRI intensities are rescaled per volume, so only noise shifts them)."""
    rng = np.random.default_rng(0)
    patients = generate_cohort(4, seed=77)

    def scores(apply) -> list[float]:
        out = []
        for i, patient in enumerate(patients):
            path = tmp_path / f"{modality}-{i}.npy"
            np.save(path, apply(np.asarray(patient.inputs[modality]), rng))
            answer = client.predict(TASKS[modality], {modality: path})
            out.append(answer.out_of_distribution[modality].score)
        return out

    plain, shifted = scores(SHIFTS["none"]), scores(SHIFTS[shift])
    print(f"{modality} {shift}: {np.round(plain, 2)} -> {np.round(shifted, 2)}")
    assert min(shifted) > max(plain)


def test_every_used_modality_has_a_score(server, client):
    folder = server.patients[0]
    inputs = {"xray": folder / "xray.dcm", "text": (folder / "note.txt").read_text()}
    response = client.predict("disease_classification", inputs)
    assert set(response.out_of_distribution) == {"xray", "text"}
    for o in response.out_of_distribution.values():
        assert o.score >= 0 and o.flagged == (o.score > o.threshold)


def test_cli_says_when_not_to_trust_an_answer(server, real_series):
    out = subprocess.run(
        [
            *(sys.executable, "-m", "multimed.cli", "predict", "--url", server.url),
            *("--task", TASKS["ct"], "--ct", str(real_series["ct"])),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MULTIMED_TOKEN": TOKEN},  # a secret never on a command line
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "OUT OF DISTRIBUTION: do not trust this answer" in out.stdout


def test_open_inference_protocol_outputs_carry_the_flag(server):
    folder, task = server.patients[0], TASKS["ct"]
    accepted = list(CATALOG.task(task).accepted)
    raw = read_input("xray", folder / FILES["xray"])
    sent = triton.InferInput(f"xray_{raw.form}", [1, 1], "BYTES")
    sent.set_data_from_numpy(np.array([[raw.data]], dtype=object))
    headers = {"authorization": f"Bearer {TOKEN}"}
    with triton.InferenceServerClient(server.url) as tc:
        config = tc.get_model_config(task, headers=headers, as_json=True)["config"]
        result = tc.infer(task, [sent], headers=headers)
    assert {"ood_score", "ood_flag"} <= {o["name"] for o in config["output"]}
    scores, flags = result.as_numpy("ood_score")[0], result.as_numpy("ood_flag")[0]
    assert scores.shape == flags.shape == (len(accepted),)
    used = accepted.index("xray")
    assert np.isfinite(scores[used]) and scores[used] >= 0
    assert np.isnan(np.delete(scores, used)).all()  # modalities the request did not carry
    assert not np.delete(flags, used).any()
