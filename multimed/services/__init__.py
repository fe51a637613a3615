"""Serving: the encoder deployments, the router and its replica, the data plane and the front
doors. The public surface is short; names load on first use so that `multimed catalog` does not
pay for Ray. The client SDK is `multimed.client`."""

from importlib import import_module

__all__ = ["DataPlane", "Router", "build_app"]

_WHERE = {
    "DataPlane": "multimed.services.dataplane",
    "Router": "multimed.services.router",
    "build_app": "multimed.services.app",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
