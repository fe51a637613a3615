"""Who may call: bearer tokens, named one per client system (`tokens.py`), checked on every
method but the probes. The token file is read again when it changes, so a token can be added or
revoked without a restart."""

from __future__ import annotations

import contextlib
import hmac
import os
import time
from pathlib import Path

import grpc

from multimed.services.frontends.grpc_common import TOKEN_NAME
from multimed.services.tokens import TOKEN_ENV, parse_tokens

RECHECK_S = 1.0  # how often the token file's modification time is looked at


class Tokens:
    """The accepted tokens; empty when neither a file nor the environment names any (no auth)."""

    def __init__(self, path: str | None = None, env: dict[str, str] | None = None):
        self.path = Path(path) if path else None
        env = os.environ if env is None else env
        self.from_env = {env[TOKEN_ENV]: "env"} if env.get(TOKEN_ENV) else {}
        self.file: dict[str, str] = {}
        self.stamp: int | None = None
        self.checked = 0.0
        self._reload()

    def _reload(self) -> None:
        if self.path is None:
            return
        stamp = self.path.stat().st_mtime_ns
        if stamp != self.stamp:
            self.file = parse_tokens(self.path.read_text(), str(self.path))
            self.stamp = stamp

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self.from_env)

    def name_of(self, bearer: str) -> str | None:
        """The name of the token in an `authorization` value, or None."""
        now = time.monotonic()
        if now - self.checked > RECHECK_S:
            self.checked = now
            # A file being rewritten can be unreadable for a moment: keep the last good tokens.
            with contextlib.suppress(OSError, ValueError):
                self._reload()
        if not bearer.startswith("Bearer "):
            return None
        sent = bearer.removeprefix("Bearer ").encode()
        found = None
        for token, name in (*self.file.items(), *self.from_env.items()):
            if hmac.compare_digest(sent, token.encode()):
                found = name  # no early exit: the time taken does not tell which matched
        return found


class TokenAuth(grpc.aio.ServerInterceptor):
    """Bearer-token check on every method but `open_methods` (prefixes: health, probes); the
    token's name is the caller's identity for the audit log."""

    def __init__(self, tokens: Tokens, open_methods: tuple[str, ...]):
        self.tokens = tokens
        self.open_methods = open_methods

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.open_methods):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        name = self.tokens.name_of(sent)
        return _deny(handler) if name is None else _named(handler, name)


def _with(handler, unary, streaming):
    """A handler of the same kind and (de)serialisers as `handler`, running `unary` (or, when
    the response streams, the async generator `streaming`) instead."""
    kind = ("stream" if handler.request_streaming else "unary") + (
        "_stream" if handler.response_streaming else "_unary"
    )
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    behaviour = streaming if handler.response_streaming else unary
    return make(behaviour, handler.request_deserializer, handler.response_serializer)


def _named(handler, name: str):
    """The handler, run with the caller's token name set."""
    # A handler holds its behaviour under the attribute of its kind; the others are None.
    original = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )

    async def unary(request, context):
        TOKEN_NAME.set(name)
        return await original(request, context)

    async def streaming(request, context):
        TOKEN_NAME.set(name)
        async for response in original(request, context):
            yield response

    return _with(handler, unary, streaming)


def _deny(handler):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        yield  # pragma: no cover - makes this an async generator for streaming handlers

    return _with(handler, unary, streaming)
