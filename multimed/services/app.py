"""The Ray Serve application: ten encoder deployments from one class, and the router replica.
`build_app` is the import path in `deploy/serve_config.yaml`, so `serve deploy` builds the same
application that `multimed serve` runs."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from multimed.models.catalog import CATALOG
from multimed.services.config import ROUTER, AppArgs, ApplicationConfig, encoder_deployment
from multimed.services.encoder import Encoder
from multimed.services.replica import RouterReplica

# Defaults sized for one small machine; the serve config overrides them per deployment.
# Batching needs max_ongoing_requests well above the batch size: Ray's default of 5 starves it.
# A replica is health-checked every 2 s (Serve's default is 10): the router's health for each
# task follows the controller's view, so a dead encoder shows within seconds.
ENCODER_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 256,
    "ray_actor_options": {"num_cpus": 0.1},
    "health_check_period_s": 2,
}
ROUTER_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 1024,
    "ray_actor_options": {"num_cpus": 0.1},
    "health_check_period_s": 2,
}


def build(config: ApplicationConfig) -> Application:
    args = config.args
    encoders = {}
    for m in CATALOG.modalities:
        if m in args.in_router:  # built by each router replica itself
            continue
        name = encoder_deployment(m)
        options = {**ENCODER_DEFAULTS, **config.deployment(name)}
        deployment = serve.deployment(Encoder).options(name=name, **options)
        backend = args.encoders.get(m)
        encoders[m] = deployment.bind(
            m,
            args.bundle,
            args.device,
            backend.model_dump() if backend else None,
            args.memory_limit_mb,
        )
    router = serve.deployment(RouterReplica).options(
        name=ROUTER, **{**ROUTER_DEFAULTS, **config.deployment(ROUTER)}
    )
    return router.bind(
        encoders,
        args.bundle,
        args.cache_entries,
        args.encoder_timeout_s,
        args.gateway.model_dump(),
        args.metrics_port,
        args.cache_mb,
        args.memory_limit_mb,
        args.hospital().model_dump(),
        {m: c.model_dump() for m, c in args.in_router.items()},
        args.device,
        args.encoder_transport,
    )


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder (`serve deploy` calls it with the config's `args`; Serve
    then applies the config's per-deployment options itself)."""
    return build(ApplicationConfig(args=AppArgs.model_validate(args)))
