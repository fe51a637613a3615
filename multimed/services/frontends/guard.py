"""Every method of the listener runs inside the guard: the token is checked before the body is
even parsed; the body is parsed here (large ones off the event loop, so health answers while a
64 MB request is read, and after their door's precheck, which counts maps without building them:
see bounds.py); a body that does not parse is INVALID_ARGUMENT; and any exception a handler lets
out is mapped through the status table, never grpc.aio's UNKNOWN."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from multimed.services.errors import Status, to_status
from multimed.services.frontends.auth import Tokens
from multimed.services.frontends.bounds import BodyRefused
from multimed.services.frontends.grpc_common import REQUEST_BYTES, TOKEN_NAME, status_code
from multimed.services.offload import off_loop_if

log = logging.getLogger("multimed.listener")

# Bodies up to this size are parsed on the event loop, where a tensor's parse costs less than
# the thread hop (measured: hop 0.12 ms of CPU; 256 kB tensor 0.007 ms). Maps cost more: a
# 256 kB gene map holds the loop ~2 ms, a 1 MB one 15 ms. At 64 kB every 128x128 X-ray hopped.
INLINE_BYTES = 256 * 1024
DENIED = "missing or wrong bearer token"


@dataclass(frozen=True)
class Unparseable:
    """A streamed request that did not parse: the door answers it as that item's error and
    reads on (unary calls are refused before the handler runs)."""

    message: str


Precheck = Callable[[bytes], None]  # raises BodyRefused for a body too costly to parse (bounds.py)


async def parse(
    deserializer: Callable[[bytes], object] | None,
    data: bytes,
    what: str,
    precheck: Precheck | None = None,
):
    """Raises ValueError with a message for the caller (never quoting the body). A large body
    passes its door's `precheck` (cheap counting) before the parse."""
    if deserializer is None:
        return data
    large = len(data) > INLINE_BYTES
    try:
        return await off_loop_if(
            large, _checked_parse, deserializer, precheck if large else None, data
        )
    except BodyRefused as e:
        raise ValueError(str(e)) from None
    except Exception:  # protobuf's DecodeError, or its recursion limit on nested messages
        raise ValueError(f"request body is not a valid {what} message") from None


def _checked_parse(deserializer, precheck: Precheck | None, data: bytes):
    if precheck is not None:
        precheck(data)
    return deserializer(data)


class Guard(grpc.aio.ServerInterceptor):
    """Token check (unless `tokens` is None or the method is open), parsing, and the last word
    on errors, for every handler on the listener."""

    def __init__(self, tokens: Tokens | None, open_methods: tuple[str, ...]):
        self.tokens = tokens
        self.open_methods = open_methods
        self.prechecks: dict[str, Precheck] = {}  # request message full name -> its precheck
        # (method, token name; None: denied) -> wrapped handler, built once rather than per
        # call: under overload every microsecond a call costs the gateway comes out of the
        # calls it can take.
        self.wrapped: dict[tuple[str, str | None], object] = {}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return handler
        name: str | None = ""
        if self.tokens is not None and not details.method.startswith(self.open_methods):
            sent = dict(details.invocation_metadata or ()).get("authorization", "")
            name = self.tokens.name_of(sent)
        key = (details.method, name)
        wrapped = self.wrapped.get(key)
        if wrapped is None:
            wrapped = self.wrapped[key] = _handler(handler, name, self.prechecks)
        return wrapped


def _message_name(handler) -> str:
    """The request message's full name (e.g. multimed.v1.PredictRequest)."""
    deserializer = handler.request_deserializer
    owner = getattr(deserializer, "__self__", None)  # FromString is bound to its message class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


def _handler(handler, token_name: str | None, prechecks: dict[str, Precheck]):
    """The same kind of handler, reading raw bytes, wrapped as the module docstring says;
    `token_name` None: the token was refused, answered without reading the request;
    `prechecks`: by request message name."""
    original = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    deserializer = handler.request_deserializer
    what = _message_name(handler)
    precheck = prechecks.get(what)

    async def request_of(request, context):
        """The parsed request (unary) or a parsing iterator (streaming); aborts when denied."""
        if token_name is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
        TOKEN_NAME.set(token_name)
        if handler.request_streaming:
            return _parsed_stream(request, deserializer, what, precheck)
        REQUEST_BYTES.set(len(request))
        try:
            return await parse(deserializer, request, what, precheck)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def unary(request, context):
        parsed = await request_of(request, context)
        try:
            return await original(parsed, context)
        except Exception as error:
            await _abort(context, error)

    async def streaming(request, context):
        parsed = await request_of(request, context)
        try:
            async for response in original(parsed, context):
                yield response
        except Exception as error:
            await _abort(context, error)

    kind = ("stream" if handler.request_streaming else "unary") + (
        "_stream" if handler.response_streaming else "_unary"
    )
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    behaviour = streaming if handler.response_streaming else unary
    return make(behaviour, None, handler.response_serializer)


async def _parsed_stream(
    requests: AsyncIterator[bytes], deserializer, what: str, precheck: Precheck | None
) -> AsyncIterator[object]:
    async for data in requests:
        REQUEST_BYTES.set(len(data))
        try:
            yield await parse(deserializer, data, what, precheck)
        except ValueError as e:
            yield Unparseable(str(e))


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """A handler's exception -> its status. An abort the handler made itself passes through."""
    if isinstance(error, grpc.aio.AbortError):
        raise error
    status, message = to_status(error)
    if status is Status.INTERNAL:
        log.error("handler failed", exc_info=error)
    await context.abort(status_code(status), message)
