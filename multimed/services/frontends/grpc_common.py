"""What every gRPC front door shares: the caller's identity, the call's description for the data
plane, and the answer (request id in metadata; a status other than OK aborts the call)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from multimed.models.catalog import TaskSpec
from multimed.services.config import HospitalSettings
from multimed.services.dataplane import CallInfo, DataPlane, Outcome
from multimed.services.errors import Status
from multimed.services.offload import OFFLOAD_BYTES, off_loop_if
from multimed.services.triton import EncoderSignature

T = TypeVar("T")

REQUEST_ID = "x-request-id"
# Set by the guard around each handler: the name of the token the call presented, and the size
# of the request body being handled (a streamed request's, for each item).
TOKEN_NAME: ContextVar[str] = ContextVar("token_name", default="")
REQUEST_BYTES: ContextVar[int] = ContextVar("request_bytes", default=0)


async def offload(function: Callable[..., T], *args) -> T:
    """`function(*args)`, in a worker thread when the request being handled is large."""
    return await off_loop_if(REQUEST_BYTES.get() > OFFLOAD_BYTES, function, *args)


@dataclass(frozen=True)
class Readiness:
    """Whether the replica serves, and which encoders have a live replica."""

    serving: bool
    live: frozenset[str]

    def task_ready(self, task: TaskSpec) -> bool:
        return (
            self.serving
            and all(m in self.live for m in task.all_of)
            and (not task.any_of or any(m in self.live for m in task.any_of))
        )

    def encoder_ready(self, modality: str) -> bool:
        return self.serving and modality in self.live


NOT_READY = Readiness(False, frozenset())


@dataclass
class Door:
    """What a front door gets to register itself on the listener, and what it tells it back."""

    plane: DataPlane  # its settings are the listener's
    signatures: dict[str, EncoderSignature]  # each modality's encoder signature
    hospital: HospitalSettings = field(default_factory=HospitalSettings)  # PACS, FHIR, rules
    services: list[str] = field(default_factory=list)  # full names, for health and reflection
    open_methods: list[str] = field(default_factory=list)  # method paths that need no token
    hooks: list[Callable[[Readiness], None]] = field(default_factory=list)
    # request message full name -> a cheap check of a large body before it is parsed
    prechecks: dict[str, Callable[[bytes], None]] = field(default_factory=dict)

    def add_service(self, full_name: str, open_methods: tuple[str, ...] = ()) -> None:
        self.services.append(full_name)
        self.open_methods.extend(f"/{full_name}/{m}" for m in open_methods)

    def on_readiness(self, hook: Callable[[Readiness], None]) -> None:
        """`hook(readiness)` runs whenever the listener's health changes (readiness probes)."""
        self.hooks.append(hook)


def status_code(status: Status) -> grpc.StatusCode:
    return grpc.StatusCode[status.name]


def caller_of(context: grpc.aio.ServicerContext, mutual_tls: bool) -> str:
    """The token's name, else the client certificate's subject (mTLS), else "anonymous".
    `mutual_tls`: whether the listener asks clients for a certificate; without it there is no
    subject, and gRPC's auth context (a dict built per call, ~20 us) is not read."""
    name = TOKEN_NAME.get()
    if name:
        return f"token:{name}"
    if not mutual_tls:
        return "anonymous"
    subject = (context.auth_context() or {}).get("x509_subject")
    if subject:
        return subject[0].decode("utf-8", errors="replace")
    return "anonymous"


def call_info(
    plane: DataPlane, context: grpc.aio.ServicerContext, method: str, sent_id: str = ""
) -> CallInfo:
    metadata = dict(context.invocation_metadata() or ())
    return CallInfo(
        method=method,
        request_id=plane.request_id(sent_id, metadata.get(REQUEST_ID)),
        caller=caller_of(context, plane.mutual_tls),
        timeout_s=plane.timeout_s(context.time_remaining()),
    )


async def answer(context: grpc.aio.ServicerContext, call: CallInfo, outcome: Awaitable[Outcome]):
    """A unary call: the result with the request id in its headers, or an error status with the
    id in its trailers. Headers are sent only with a result: once a client has headers, gRPC
    may not retry the call, and the SDK's retries on UNAVAILABLE must work (sent before the
    work, they let an X-ray replica's death lose 1-2 calls of 600 despite retries)."""
    done = await outcome
    if done.status is not Status.OK:
        context.set_trailing_metadata(((REQUEST_ID, call.request_id),))
        await context.abort(status_code(done.status), done.message)
    await context.send_initial_metadata(((REQUEST_ID, call.request_id),))
    return done.result
