"""Serving configuration, typed at the edge. `deploy/serve_config.yaml` is a Ray Serve config
(`serve deploy` accepts it on a cluster); `multimed serve` validates it here first, so a wrong key
is a clear error rather than a silently ignored one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from multimed.models.catalog import CATALOG
from multimed.models.config import Precision

ROUTER = "router"
# The custom Ray resource of the nodes clients connect to: the serve config pins the router
# replicas (the gRPC gateway and /metrics) to it. `multimed serve`'s embedded Ray declares it; on
# a cluster, `ray start --resources='{"gateway": 1}'` on the head (compose) or the gateway group
# (KubeRay).
GATEWAY_RESOURCE = "gateway"


def encoder_deployment(modality: str) -> str:
    return f"encoder-{modality}"


DEPLOYMENT_NAMES = (ROUTER, *(encoder_deployment(m) for m in CATALOG.modalities))


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchConfig(Strict):
    """An encoder's dynamic batching (its Ray Serve `user_config`; changeable live). There is no
    batch wait, as in Triton's default: an idle model runs whatever is queued at once, and
    inputs arriving while `batches_in_flight` batches run form the next batch, so batches grow
    with the load by themselves. (A fixed wait cost every lone call its full length.)"""

    max_batch_size: int = Field(16, ge=1, le=1024)
    batches_in_flight: int = Field(1, ge=1, le=16)  # forward passes at once, each in a thread
    torch_threads: int = Field(1, ge=1, le=256)
    precision: Precision = "fp32"  # bf16: autocast, for GPUs with bfloat16 tensor cores


class ClientTLS(Strict):
    """TLS on an outgoing gRPC channel: the CA that signs the server's certificate (default: the
    system's roots) and, for mTLS, this client's own certificate and key. PEM file paths."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> ClientTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        return self


class EncoderBackend(Strict):
    """Where an encoder's trainable model runs. `triton`: the encoder decodes, preprocesses and
    runs the frozen features stage itself, then sends each batch's model-ready tensor to an Open
    Inference Protocol server (Triton with `multimed export`'s repository, or another MultiMed
    gateway) over gRPC."""

    backend: Literal["torch", "triton"] = "torch"
    url: str | None = None  # host:port of the server's gRPC endpoint
    model: str | None = None  # default: encoder_<modality>
    timeout_s: float = Field(10.0, gt=0)  # per batch
    token_file: str | None = None  # its first token is sent as "authorization: Bearer <token>"
    tls: ClientTLS | None = None  # None: plaintext

    @model_validator(mode="after")
    def _url_for_triton(self) -> EncoderBackend:
        if self.backend == "triton" and not self.url:
            raise ValueError("backend: triton needs url (host:port)")
        return self


class TLSSettings(Strict):
    """The listener's certificate and key, and with `client_ca` mutual TLS: a client must show a
    certificate signed by that CA. PEM file paths; the files are read again when they change."""

    cert: str
    key: str
    client_ca: str | None = None


class FrontSettings(Strict):
    """A native front (nginx) on the gateway's address, before the Python listener: past
    `max_calls` calls open at once it answers RESOURCE_EXHAUSTED itself, fast at rates the listener
    cannot take calls at (see frontends/front.py); it ends TLS. Health calls are not limited."""

    # Per router replica. The router runs coalesce_slots x coalesce_max (2 x 64) Predict calls at
    # once; calls past that only wait, holding memory (and under overload, CPU).
    max_calls: int = Field(128, ge=1)
    nginx: str = "nginx"  # the binary (Debian: nginx-light)
    # The nice of its worker: refusals stay fast while replicas take every core (needs root or
    # CAP_SYS_NICE below 0; otherwise nginx logs it and runs at the default).
    priority: int = Field(-10, ge=-20, le=19)


class GatewaySettings(Strict):
    """The gRPC front doors, run inside each router replica. Secrets are never values here: the
    token file and TLS key are paths (tokens may also come from MULTIMED_TOKEN)."""

    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)  # 0: any free port
    max_message_mb: float = Field(64, gt=0)
    # Admission, in front of every queue: past each limit a call is RESOURCE_EXHAUSTED at once.
    max_in_flight: int = Field(1024, ge=1)  # items (a 64-item ModelInfer counts 64) in progress
    max_rpcs: int = Field(2048, ge=1)  # RPCs open at once, streams included (gRPC refuses more)
    max_connections: int = Field(1024, ge=1)  # client connections at once
    default_timeout_s: float = Field(60, gt=0)  # for calls that carry no deadline
    stream_concurrency: int = Field(64, ge=1)  # requests in progress (and answers buffered)
    max_stream_s: float = Field(3600, gt=0)  # a PredictStream's lifetime; then DEADLINE_EXCEEDED
    reflection: bool = True  # gRPC server reflection (needs a token when tokens are on)
    token_file: str | None = None  # named bearer tokens (see frontends/auth.py); None: no file
    tls: TLSSettings | None = None  # None: plaintext (loopback only, or TLS in front)
    audit_log: str | None = None  # also append the audit log's JSON lines to this file
    coalesce_max: int = Field(64, ge=1)  # Predict calls per router call
    coalesce_slots: int = Field(2, ge=1)  # router calls in flight at once
    front: FrontSettings | None = None  # None: the listener takes calls on the port itself

    @model_validator(mode="after")
    def _front_fits(self) -> GatewaySettings:
        if self.front is None:
            return self
        if self.port == 0:
            raise ValueError("gateway.front needs a fixed port (nginx cannot pick one)")
        if self.tls is not None and self.tls.client_ca is not None:
            raise ValueError(
                "gateway.front ends TLS, so the listener would not see client certificates: "
                "mutual TLS (tls.client_ca) needs the listener on the port (leave front out)"
            )
        return self

    def with_absolute_paths(self) -> GatewaySettings:
        """The same settings with every file path absolute: replicas may start in another
        working directory."""

        tls = self.tls
        if tls is not None:
            tls = TLSSettings(
                cert=_absolute(tls.cert), key=_absolute(tls.key), client_ca=_absolute(tls.client_ca)
            )
        return self.model_copy(
            update={
                "token_file": _absolute(self.token_file),
                "audit_log": _absolute(self.audit_log),
                "tls": tls,
            }
        )


class PacsSettings(Strict):
    """A PACS the server may read studies from and store results into, over DICOMweb. Clients
    name it; the server never fetches from a URL a client sends."""

    url: str  # DICOMweb base URL, e.g. http://pacs:8042/dicom-web
    username: str | None = None  # HTTP basic authentication, with the password from a file
    password_file: str | None = None
    timeout_s: float = Field(30.0, gt=0)  # per HTTP request
    ca: str | None = None  # PEM CA bundle for an https URL (default: the system's roots)
    # Orthanc's REST API base (e.g. http://pacs:8042): `multimed watch` follows its changes
    # feed. None: the watcher polls QIDO-RS for today's studies instead.
    orthanc_url: str | None = None

    @model_validator(mode="after")
    def _credentials(self) -> PacsSettings:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


class FhirSettings(Strict):
    """The FHIR server that study results are POSTed to, as R4 transaction bundles."""

    url: str  # the FHIR base URL
    token_file: str | None = None  # its first token is sent as "Authorization: Bearer ..."
    timeout_s: float = Field(30.0, gt=0)
    attempts: int = Field(4, ge=1, le=20)  # with exponential backoff between them


class SeriesRule(Strict):
    """Routes a study's series to a modality when every field given matches; rules are tried in
    order before the default table (DICOM Modality: DX/CR -> xray, CT -> ct, MR -> mri,
    OPT -> oct, SM -> pathology). `modality: ignore` leaves matching series out."""

    modality: str
    dicom_modality: list[str] | None = None  # e.g. [DX, CR]
    description: str | None = None  # a regular expression searched in Series Description
    body_part: list[str] | None = None  # Body Part Examined values, e.g. [CHEST]

    @field_validator("modality")
    @classmethod
    def _known(cls, modality: str) -> str:
        if modality != "ignore" and modality not in CATALOG.modalities:
            known = ", ".join(CATALOG.modalities)
            raise ValueError(f"unknown modality {modality!r}; known: {known}, or ignore")
        return modality

    @field_validator("description")
    @classmethod
    def _regex(cls, description: str | None) -> str | None:
        if description is not None:
            try:
                re.compile(description)
            except re.error as e:
                raise ValueError(f"description is not a regular expression: {e}") from None
        return description


class HospitalSettings(Strict):
    """What the hospital door reads (`AppArgs.hospital()`): PACS, FHIR endpoint, series rules."""

    pacs: dict[str, PacsSettings] = Field(default_factory=dict)
    fhir: FhirSettings | None = None
    series_rules: list[SeriesRule] = Field(default_factory=list)


class AppArgs(Strict):
    """Arguments of the application builder (`multimed.services.app:build_app`)."""

    bundle: str = "artifacts/default-bundle"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when the replica has a GPU
    cache_entries: int = Field(4096, ge=0)  # router's embedding cache; 0 disables it
    cache_mb: float = Field(256, ge=0)  # ... and its size in memory (token embeddings are big)
    encoder_timeout_s: float = Field(30.0, gt=0)
    # How the router reaches encoder replicas. grpc: Serve's direct gRPC channel to each
    # replica, inputs pickled into the message. ray: Ray actor calls (inputs over 100 KB go
    # through the object store). Measured on 2 cores, image task at c=1: 11.3 -> 8.2 ms of
    # server CPU a request, p50 8.7 -> 6.9 ms (bench/RESULTS.md, run H).
    encoder_transport: Literal["grpc", "ray"] = "grpc"
    # Per replica: past it, the replica fails its health check and Serve replaces it. None: none.
    memory_limit_mb: float | None = Field(4096, gt=0)
    gateway: GatewaySettings = GatewaySettings()
    metrics_port: int | None = Field(8002, ge=0, le=65535)  # None: no /metrics endpoint
    encoders: dict[str, EncoderBackend] = Field(default_factory=dict)  # by modality; default torch
    # Opt-in placement: these modalities' encoders run inside each router replica (its CPU or
    # GPU), with the same per-input decoding, errors and batches, and no deployment of their
    # own. For light encoders it saves a Ray hop a call (bench/RESULTS.md, run H); they then
    # scale with the router, not on their own.
    in_router: dict[str, BatchConfig] = Field(default_factory=dict)
    pacs: dict[str, PacsSettings] = Field(default_factory=dict)  # by the name clients use
    fhir: FhirSettings | None = None  # None: study results are returned, not sent
    series_rules: list[SeriesRule] = Field(default_factory=list)

    def hospital(self) -> HospitalSettings:
        """The hospital door's settings, every file path absolute (replicas may start in
        another working directory)."""
        pacs = {
            name: p.model_copy(
                update={"password_file": _absolute(p.password_file), "ca": _absolute(p.ca)}
            )
            for name, p in self.pacs.items()
        }
        fhir = self.fhir
        if fhir is not None:
            fhir = fhir.model_copy(update={"token_file": _absolute(fhir.token_file)})
        return HospitalSettings(pacs=pacs, fhir=fhir, series_rules=self.series_rules)

    @field_validator("encoders", "in_router")
    @classmethod
    def _modalities(cls, by_modality: dict) -> dict:
        unknown = set(by_modality) - set(CATALOG.modalities)
        if unknown:
            known = ", ".join(CATALOG.modalities)
            raise ValueError(f"unknown modality {sorted(unknown)[0]!r}; known: {known}")
        return by_modality

    @model_validator(mode="after")
    def _placed_once(self) -> AppArgs:
        remote = set(self.in_router) & {m for m, e in self.encoders.items() if e.backend != "torch"}
        if remote:
            raise ValueError(
                f"encoder {sorted(remote)[0]!r} is both in_router and on a remote backend"
            )
        return self


class DeploymentConfig(Strict):
    """The per-deployment options we let operators set (a subset of Ray Serve's)."""

    name: str
    num_replicas: int | Literal["auto"] | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=-1)
    max_replicas_per_node: int | None = Field(None, ge=1)  # 1: a node's loss takes one replica
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] | None = None
    user_config: BatchConfig | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DEPLOYMENT_NAMES:
            raise ValueError(f"unknown deployment {name!r}; known: {', '.join(DEPLOYMENT_NAMES)}")
        return name

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options()`."""
        return self.model_dump(exclude_none=True, exclude={"name"})


class ApplicationConfig(Strict):
    name: str = "multimed"
    route_prefix: str | None = None
    import_path: Literal["multimed.services.app:build_app"] = "multimed.services.app:build_app"
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    args: AppArgs = AppArgs()
    deployments: list[DeploymentConfig] = Field(default_factory=list)

    def deployment(self, name: str) -> dict[str, Any]:
        return next((d.options() for d in self.deployments if d.name == name), {})

    @model_validator(mode="after")
    def _no_options_for_absent_deployments(self) -> ApplicationConfig:
        absent = {encoder_deployment(m) for m in self.args.in_router}
        for d in self.deployments:
            if d.name in absent:
                raise ValueError(
                    f"deployment {d.name!r} has options, but args.in_router runs that encoder "
                    "inside the router: remove one of the two"
                )
        return self


class ServeConfigFile(Strict):
    """The subset of Ray Serve's multi-application config that this product uses (fields that
    only `serve deploy` reads, like proxy_location, are accepted and passed over)."""

    proxy_location: str | None = None
    http_options: dict[str, Any] | None = None
    applications: list[ApplicationConfig] = Field(min_length=1, max_length=1)

    @property
    def app(self) -> ApplicationConfig:
        return self.applications[0]


def load_serve_config(path: str | Path | None) -> ServeConfigFile:
    if path is None:
        return ServeConfigFile(applications=[ApplicationConfig()])
    try:
        raw = yaml.safe_load(Path(path).read_text())
        return ServeConfigFile.model_validate(raw)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"serve config {path}: {e}") from None
    except ValidationError as e:
        raise ValueError(f"serve config {path} is invalid:\n{e}") from None
