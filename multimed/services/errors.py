"""The one mapping from domain errors to gRPC status codes."""

from __future__ import annotations

import asyncio

import grpc
from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError

from multimed.models import errors as e
from multimed.services.oip import ModelNotFound, ProtocolError

# Most specific first: the first matching class decides. Missing required modalities are
# FAILED_PRECONDITION (the request is well formed; the task's precondition is not met).
STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (e.InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.UnknownTask, grpc.StatusCode.INVALID_ARGUMENT),
    (e.UnknownModality, grpc.StatusCode.INVALID_ARGUMENT),
    (e.UnexpectedModality, grpc.StatusCode.INVALID_ARGUMENT),
    (e.MissingModality, grpc.StatusCode.FAILED_PRECONDITION),
    (e.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackPressureError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (asyncio.CancelledError, grpc.StatusCode.CANCELLED),
    (ray_exceptions.TaskCancelledError, grpc.StatusCode.CANCELLED),
    (ray_exceptions.RayActorError, grpc.StatusCode.UNAVAILABLE),
)


def unwrap(error: BaseException) -> BaseException:
    """Ray re-raises a replica's exception wrapped; the cause is what the user should see."""
    while isinstance(error, ray_exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    return error


def to_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    error = unwrap(error)
    for cls, code in STATUS:
        if isinstance(error, cls):
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return code, "deadline exceeded before the answer was ready"
            return code, str(error) or cls.__name__
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see server logs"
