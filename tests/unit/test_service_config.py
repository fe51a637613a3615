"""Serving's edges that need no running server: config validation, the error mapping, and the
wire conversion."""

import grpc
import numpy as np
import pytest

from multimed.models import errors
from multimed.models.catalog import InputForm
from multimed.models.inputs import RawInput
from multimed.services import errors as service_errors
from multimed.services.config import load_serve_config
from multimed.services.errors import STATUS, Status, to_status
from multimed.services.frontends.multimed_v1.inputs import input_from_wire, input_to_wire
from multimed.v1 import multimed_pb2 as pb


def test_shipped_serve_config_is_valid():
    config = load_serve_config("deploy/serve_config.yaml")
    assert config.app.import_path == "multimed.services.app:build_app"
    assert config.app.deployment("encoder-xray")["user_config"]["max_batch_size"] == 32


def test_replicas_can_be_spread_over_nodes(tmp_path):
    path = tmp_path / "spread.yaml"
    path.write_text("applications: [{deployments: [{name: router, max_replicas_per_node: 1}]}]")
    assert load_serve_config(path).app.deployment("router") == {"max_replicas_per_node": 1}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("applications: [{args: {bundel: x}}]", "bundel"),
        ("applications: [{args: {encoders: {xray: {backend: triton}}}}]", "needs url"),
        ("applications: [{args: {encoders: {smell: {backend: torch}}}}]", "unknown modality"),
        ("applications: [{deployments: [{name: encoder-smell}]}]", "unknown deployment"),
        ("applications: [{deployments: [{name: encoder-xray, num_replica: 2}]}]", "num_replica"),
        (
            "applications: [{deployments: [{name: encoder-xray, user_config: {max_batch: 2}}]}]",
            "max_batch",
        ),
        (
            "applications: [{deployments: [{name: encoder-xray, max_replicas_per_node: 0}]}]",
            "max_replicas_per_node",
        ),
        ("applications: [{args: {in_router: {smell: {}}}}]", "unknown modality"),
        (
            "applications: [{args: {in_router: {xray: {}}}, deployments: [{name: encoder-xray}]}]",
            "inside the router: remove one",
        ),
        (
            "applications: [{args: {in_router: {xray: {}}, "
            "encoders: {xray: {backend: triton, url: 'h:1'}}}}]",
            "both in_router and on a remote backend",
        ),
        (
            "applications: [{deployments: [{name: encoder-ct, user_config: {batch_wait_ms: 2}}]}]",
            "batch_wait_ms",
        ),
    ],
)
def test_a_wrong_key_is_a_clear_error(tmp_path, text, complaint):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=complaint):
        load_serve_config(path)


def test_every_domain_error_is_mapped_and_none_is_unknown():
    mapped = {cls for cls, _ in STATUS}
    domain = {
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.MultiMedError)
    }
    domain |= {service_errors.ProtocolError, service_errors.ModelNotFound}
    assert domain - {errors.MultiMedError} <= mapped
    status, message = to_status(errors.InputError("eeg", "missing channels: C3"))
    assert status is Status.INVALID_ARGUMENT and message == "eeg: missing channels: C3"
    assert to_status(RuntimeError("boom"))[0] is Status.INTERNAL


def test_every_status_is_a_grpc_code_with_an_http_status():
    for status in Status:
        assert grpc.StatusCode[status.name].value[0] == status.grpc_code
        assert 200 <= status.http_status < 600


def test_domain_errors_survive_pickling():
    import pickle

    for error in (
        errors.InputError("ct", "corrupt DICOM"),
        errors.UnknownTask("x", ("a", "b")),
        errors.UnknownModality("y", ("a",)),
    ):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)


@pytest.mark.parametrize(
    "raw",
    [
        RawInput("text", InputForm.TEXT, "chest pain"),
        RawInput("xray", InputForm.DICOM, b"\x00DICM"),
        RawInput("ct", InputForm.DICOM_SERIES, [b"a", b"b"]),
        RawInput("scrna", InputForm.GENE_COUNTS, {"CD3E": 4.0}),
        RawInput("eeg", InputForm.TENSOR, np.arange(6, dtype=np.float32).reshape(2, 3)),
    ],
)
def test_inputs_round_trip_the_wire(raw):
    back = input_from_wire(pb.ModalityInput.FromString(input_to_wire(raw).SerializeToString()))
    assert back.modality == raw.modality and back.form == raw.form
    if isinstance(raw.data, np.ndarray):
        assert np.array_equal(back.data, raw.data)
    else:
        assert back.data == raw.data


def test_tensor_with_wrong_byte_count_is_refused():
    item = pb.ModalityInput(
        modality="xray",
        tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 4, 4], data=b"\x00" * 10),
    )
    with pytest.raises(errors.InputError, match="xray: tensor of shape"):
        input_from_wire(item)


def test_gateway_file_paths_are_made_absolute_for_replicas(tmp_path, monkeypatch):
    from multimed.services.config import GatewaySettings

    monkeypatch.chdir(tmp_path)
    settings = GatewaySettings(
        token_file="tokens", audit_log="logs/audit.jsonl", tls={"cert": "s.pem", "key": "s.key"}
    ).with_absolute_paths()
    assert settings.token_file == str(tmp_path / "tokens")
    assert settings.audit_log == str(tmp_path / "logs/audit.jsonl")
    assert (settings.tls.cert, settings.tls.client_ca) == (str(tmp_path / "s.pem"), None)
