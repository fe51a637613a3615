"""Serving: encoder deployments, the fusion router, the gRPC gateway, the client SDK and CLI.

The public surface is short; names load on first use so that `multimed catalog` and the client
do not pay for Ray."""

from importlib import import_module

__all__ = ["AsyncMultiMedClient", "MultiMedClient", "build_app"]

_WHERE = {
    "AsyncMultiMedClient": "multimed.services.client",
    "MultiMedClient": "multimed.services.client",
    "build_app": "multimed.services.app",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
