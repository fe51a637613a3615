"""docker-compose.yml, the Dockerfile and the compose secrets, checked without Docker: the file
against the compose spec, every host path and secret it names, its ports against what the
product listens on, its command lines against the real parsers (`multimed`'s argparse, `ray
start`'s click), the head's healthcheck against a real TLS gRPC health server, and the compose
serve config against deploy/serve_config.yaml."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from multimed.cli import build_parser
from multimed.services.config import load_serve_config
from multimed.services.server import REPLICA_ENV
from multimed.services.tokens import parse_tokens

ROOT = Path(__file__).resolve().parents[2]
MAKE_SECRETS = ROOT / "deploy/compose/make-secrets.sh"
SECRETS_DIR = ROOT / "secrets"  # what make-secrets.sh writes by default
# Where deploy/compose/serve_config.yaml may differ from deploy/serve_config.yaml.
COMPOSE_ONLY_KEYS = [("applications", 0, "args", "pacs")]
HEAD, WORKER = "ray-head", "ray-worker"
# What the other services listen on in their containers (their images' defaults).
LISTENS = {"orthanc": {8042}, "prometheus": {9090}, "grafana": {3000}}
ON_THE_NETWORK = {(HEAD, 8001)}  # gRPC: TLS + tokens; every other port is published on loopback


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def made_secrets(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compose") / "secrets"
    subprocess.run([MAKE_SECRETS, out], check=True, capture_output=True, timeout=60)
    return out


def _services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def _mounts(service: dict) -> dict[str, Path]:
    """Bind mounts: container path -> host path (named volumes left out)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def _secret_paths(compose: dict, service: dict) -> dict[str, Path]:
    """Secrets: container path -> host file."""
    paths = {}
    for secret in service.get("secrets", []):
        name = secret if isinstance(secret, str) else secret["source"]
        target = secret if isinstance(secret, str) else secret.get("target", name)
        paths[str(Path("/run/secrets", target))] = (
            ROOT / compose["secrets"][name]["file"]
        ).resolve()
    return paths


def _command_lines(service: dict) -> list[list[str]]:
    """The argv of each command a service runs: its command list, or each line of an `sh -c`
    script (continuations joined, `exec` dropped)."""
    command = service.get("command")
    if command is None:
        return []
    if command[0] != "sh":
        return [command]
    lines = command[-1].replace("\\\n", " ").splitlines()
    argvs = [shlex.split(line) for line in lines if line.strip()]
    return [argv[1:] if argv[0] == "exec" else argv for argv in argvs]


def _runs(compose: dict, program: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    return [
        (name, argv)
        for name, service in _services(compose).items()
        for argv in _command_lines(service)
        if tuple(argv[: len(program)]) == program
    ]


def _ports(service: dict) -> list[tuple[str, int]]:
    """(host address, container port) of each published port; short syntax
    [[ADDRESS:]HOST:]CONTAINER or the long one."""
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published.append((port.get("host_ip", "0.0.0.0"), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        published.append((parts[0] if len(parts) == 3 else "0.0.0.0", int(parts[-1])))
    return published


def _ray_start(argv: list[str]) -> dict:
    """`ray start`'s own click parser: an unknown flag or a bad value raises a UsageError."""
    from ray.scripts.scripts import start

    return start.make_context("ray start", argv[2:]).params


def _multimed_args(argv: list[str]):
    """`multimed`'s own parser: an unknown flag or a bad value fails the test, naming the line."""
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{shlex.join(argv)} does not parse")


def _serve(compose: dict):
    """The head's `multimed serve`: its parsed arguments, the config file on the host that its
    --config names (through the head's bind mounts), and that config loaded."""
    [(name, argv)] = _runs(compose, ("multimed", "serve"))
    assert name == HEAD
    args = _multimed_args(argv)
    config_file = _mounts(_services(compose)[HEAD])[str(args.config)]
    return args, config_file, load_serve_config(config_file)


def _gateway_ports(compose: dict) -> tuple[int, int]:
    args, _, config = _serve(compose)
    app = config.app.args
    return args.port or app.gateway.port, args.metrics_port or app.metrics_port


def test_compose_file_follows_the_compose_spec():
    check = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [check, "--builtin-schema", "vendor.compose-spec", ROOT / "docker-compose.yml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_host_path_it_names_exists(compose):
    for name, service in _services(compose).items():
        build = service.get("build")
        if build is not None:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for target, source in _mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
    for name, secret in compose["secrets"].items():
        # Secrets are the generated ones only: never a file committed in the repository.
        assert (ROOT / secret["file"]).resolve().parent == SECRETS_DIR, name


def test_secrets_are_exactly_what_make_secrets_makes(compose, made_secrets):
    files = {Path(s["file"]).name for s in compose["secrets"].values()}
    assert files == {p.name for p in made_secrets.iterdir()}
    used = {
        s if isinstance(s, str) else s["source"]
        for v in _services(compose).values()
        for s in v.get("secrets", [])
    }
    assert used == set(compose["secrets"])


def test_each_secret_path_a_service_reads_is_mounted_in_it(compose):
    """/run/secrets/... named in a service's definition or in a file mounted into it (the serve
    config, prometheus.yml) must be one of that service's secrets."""
    for name, service in _services(compose).items():
        texts = [yaml.safe_dump(service)]
        for source in _mounts(service).values():
            files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
            texts += [f.read_text() for f in files]
        named = set(re.findall(r"/run/secrets/[\w.-]*\w", "\n".join(texts)))
        assert named <= set(_secret_paths(compose, service)), name


def test_made_secrets_fit_together(compose, made_secrets):
    assert made_secrets.stat().st_mode & 0o777 == 0o700  # the folder keeps other users out
    for f in made_secrets.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name  # readable by the containers' users
    tokens = parse_tokens((made_secrets / "multimed_tokens").read_text(), "multimed_tokens")
    assert list(tokens.values()) == ["client", "prometheus"]  # a client sends the first one
    assert tokens[(made_secrets / "metrics_token").read_text()] == "prometheus"
    assert len((made_secrets / "ray_token").read_text()) == 64
    # The application's PACS user is the one Orthanc's configuration defines.
    pacs = _serve(compose)[2].app.args.pacs["main"]
    users = json.loads((made_secrets / "orthanc_users.json").read_text())["RegisteredUsers"]
    assert users == {pacs.username: (made_secrets / "pacs_password").read_text()}
    cert = x509.load_pem_x509_certificate((made_secrets / "tls_cert").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", HEAD} <= set(names.get_values_for_type(x509.DNSName))


def test_make_secrets_never_overwrites(made_secrets):
    before = {p.name: p.read_bytes() for p in made_secrets.iterdir()}
    again = subprocess.run([MAKE_SECRETS, made_secrets], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "not overwriting" in again.stderr
    assert {p.name: p.read_bytes() for p in made_secrets.iterdir()} == before


def test_published_ports_are_ones_the_product_listens_on(compose):
    grpc_port, metrics_port = _gateway_ports(compose)
    [(_, ray_head)] = [run for run in _runs(compose, ("ray", "start")) if run[0] == HEAD]
    listens = {**LISTENS, HEAD: {grpc_port, metrics_port, _ray_start(ray_head)["dashboard_port"]}}
    assert (grpc_port, metrics_port) == (8001, 8002)  # DESIGN.md: the product's ports
    for name, service in _services(compose).items():
        for address, port in _ports(service):
            assert port in listens.get(name, set()), f"{name} publishes {port}"
            if (name, port) not in ON_THE_NETWORK:
                assert address == "127.0.0.1", f"{name}:{port} is published beyond this host"
    worker = _services(compose)[WORKER]
    assert "ports" not in worker and "container_name" not in worker  # --scale ray-worker=N


def test_prometheus_scrapes_the_gateway_metrics_port(compose):
    prometheus = _services(compose)["prometheus"]
    mounts = _mounts(prometheus)
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "multimed"]
    targets = {t for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"{HEAD}:{_gateway_ports(compose)[1]}"}
    assert job["authorization"]["credentials_file"] in _secret_paths(compose, prometheus)
    for rule_file in config["rule_files"]:
        assert str(Path("/etc/prometheus", rule_file)) in mounts, rule_file


def test_grafana_reads_the_prometheus_service_and_the_mounted_dashboards(compose):
    grafana = _services(compose)["grafana"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (mounts["/var/lib/grafana/dashboards"] / "multimed.json").is_file()
    sources = [
        s
        for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for s in yaml.safe_load(f.read_text()).get("datasources", [])
    ]
    urls = {urlsplit(s["url"]).netloc for s in sources if s["type"] == "prometheus"}
    assert urls == {f"prometheus:{next(iter(LISTENS['prometheus']))}"}
    providers = [
        p
        for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text()).get("providers", [])
    ]
    assert providers and all(p["options"]["path"] in mounts for p in providers)


def test_multimed_command_lines_parse_and_name_a_valid_config(compose):
    runs = _runs(compose, ("multimed",))
    assert runs
    for _, argv in runs:
        _multimed_args(argv)
    args, _, config = _serve(compose)  # --config names a mounted file that loads
    assert args.ray_address == "auto" and args.host == "0.0.0.0"
    assert config.app.args.bundle == "artifacts/default-bundle"  # where the image has it


def test_ray_nodes_start_with_real_flags_and_join_with_the_same_token(compose):
    runs = dict(_runs(compose, ("ray", "start")))
    assert set(runs) == {HEAD, WORKER}
    head, worker = _ray_start(runs[HEAD]), _ray_start(runs[WORKER])
    # The router replicas (gateway and /metrics) go where the published ports are.
    assert head["head"] and json.loads(head["resources"]) == {"gateway": 1}
    assert (
        not worker["head"] and worker["block"] and "gateway" not in json.loads(worker["resources"])
    )
    assert worker["address"] == f"{HEAD}:{head['port']}"
    _, _, config = _serve(compose)
    assert config.app.deployment("router")["ray_actor_options"]["resources"] == {"gateway": 0.001}
    for name in (HEAD, WORKER):
        service = _services(compose)[name]
        environment = service["environment"]
        assert environment["RAY_AUTH_MODE"] == "token"
        assert environment["RAY_AUTH_TOKEN_PATH"] in _secret_paths(compose, service), name
        assert REPLICA_ENV.items() <= environment.items(), name  # what replicas inherit


def test_head_healthcheck_is_grpc_health_over_the_gateway_tls(compose, made_secrets):
    test = _services(compose)[HEAD]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    args, _, _ = _serve(compose)
    address = f"localhost:{_gateway_ports(compose)[0]}"
    assert args.tls_cert in test[3] and address in test[3]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    key, cert = (made_secrets / "tls_key").read_bytes(), (made_secrets / "tls_cert").read_bytes()
    port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    script = test[3].replace(args.tls_cert, str(made_secrets / "tls_cert"))
    script = script.replace(address, f"localhost:{port}")

    def check() -> int:
        return subprocess.run(
            [sys.executable, "-c", script], capture_output=True, timeout=30
        ).returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() != 0
    finally:
        server.stop(None)


def test_compose_serve_config_is_the_base_one_but_the_declared_keys():
    base = yaml.safe_load((ROOT / "deploy/serve_config.yaml").read_text())
    ours = yaml.safe_load((ROOT / "deploy/compose/serve_config.yaml").read_text())

    def without(tree: dict) -> dict:
        tree = copy.deepcopy(tree)
        for *parents, key in COMPOSE_ONLY_KEYS:
            node = tree
            for parent in parents:
                node = node[parent]
            node.pop(key, None)
        return tree

    assert without(ours) == without(base)
    pacs = load_serve_config(ROOT / "deploy/compose/serve_config.yaml").app.args.pacs["main"]
    url = urlsplit(pacs.url)
    assert (url.hostname, url.port, url.path) == ("orthanc", 8042, "/dicom-web")
    assert url.port in LISTENS[url.hostname]


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest)
        for word, _, rest in (line.partition(" ") for line in lines)
        if word and not word.startswith("#")
    ]


def test_dockerfile_copies_what_exists_and_exposes_what_compose_publishes(compose):
    ignored = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert {".git", ".venv", "secrets", "artifacts"} <= set(ignored)  # never in the build context
    instructions = _dockerfile()
    for word, rest in instructions:
        if word == "COPY" and "--from=" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), source
                assert not any(fnmatch.fnmatch(source, p) for p in ignored), source
    exposed = {int(p) for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    built = [s for s in _services(compose).values() if "build" in s]
    assert {port for s in built for _, port in _ports(s)} <= exposed
    torch = re.search(r"pip install -q torch==(\S+)", (ROOT / "Makefile").read_text())
    assert ("ARG", f"TORCH_VERSION={torch[1]}") in instructions  # the Makefile's pin
