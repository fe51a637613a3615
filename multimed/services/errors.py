"""The one mapping from errors to statuses. Every front door answers with these; each status names
its gRPC code and its HTTP status, so a new protocol reads the same table."""

from __future__ import annotations

import asyncio
from enum import Enum

from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError

from multimed.models import errors as e


class ProtocolError(e.MultiMedError):
    """A request that breaks its protocol or a model's metadata (INVALID_ARGUMENT)."""


class ModelNotFound(e.MultiMedError):
    """No such model or version (NOT_FOUND)."""


class ModelFault(e.MultiMedError):
    """A model produced what no input can excuse (non-finite embeddings or scores): INTERNAL,
    with a message that names the model but no value."""


class StudyNotFound(e.MultiMedError):
    """A PACS holds no such study (NOT_FOUND)."""


class PacsUnavailable(e.BackendUnavailable):
    """A configured PACS or FHIR server failed, refused us or did not answer in time
    (UNAVAILABLE); the message names it."""


class Expired(e.MultiMedError, TimeoutError):
    """An item's deadline passed before its encoder ran it: dropped unrun."""


class Status(Enum):
    """(gRPC code, HTTP status). The names are gRPC's, so `grpc.StatusCode[status.name]`."""

    OK = (0, 200)
    CANCELLED = (1, 499)
    INVALID_ARGUMENT = (3, 400)
    DEADLINE_EXCEEDED = (4, 504)
    NOT_FOUND = (5, 404)
    RESOURCE_EXHAUSTED = (8, 429)
    FAILED_PRECONDITION = (9, 422)
    UNIMPLEMENTED = (12, 501)
    INTERNAL = (13, 500)
    UNAVAILABLE = (14, 503)
    UNAUTHENTICATED = (16, 401)

    @property
    def grpc_code(self) -> int:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


# Most specific first: the first matching class decides. Missing required modalities are
# FAILED_PRECONDITION (the request is well formed; the task's precondition is not met).
STATUS: tuple[tuple[type[BaseException], Status], ...] = (
    (ProtocolError, Status.INVALID_ARGUMENT),
    (ModelNotFound, Status.NOT_FOUND),
    (StudyNotFound, Status.NOT_FOUND),
    (e.InputError, Status.INVALID_ARGUMENT),
    (e.UnknownTask, Status.INVALID_ARGUMENT),
    (e.UnknownModality, Status.INVALID_ARGUMENT),
    (e.UnexpectedModality, Status.INVALID_ARGUMENT),
    (e.MissingModality, Status.FAILED_PRECONDITION),
    (e.Overloaded, Status.RESOURCE_EXHAUSTED),
    (BackPressureError, Status.RESOURCE_EXHAUSTED),
    (e.BundleError, Status.FAILED_PRECONDITION),
    (e.BackendUnavailable, Status.UNAVAILABLE),
    (ModelFault, Status.INTERNAL),
    (TimeoutError, Status.DEADLINE_EXCEEDED),
    (asyncio.CancelledError, Status.CANCELLED),
    (ray_exceptions.TaskCancelledError, Status.CANCELLED),
    (ray_exceptions.RayActorError, Status.UNAVAILABLE),
)


def unwrap(error: BaseException) -> BaseException:
    """Ray re-raises a replica's exception wrapped; the cause is what the user should see."""
    while isinstance(error, ray_exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    return error


def to_status(error: BaseException) -> tuple[Status, str]:
    error = unwrap(error)
    for cls, status in STATUS:
        if isinstance(error, cls):
            if status is Status.DEADLINE_EXCEEDED:
                return status, "deadline exceeded before the answer was ready"
            return status, str(error) or cls.__name__
    return Status.INTERNAL, f"internal error ({type(error).__name__}); see server logs"
