"""`multimed serve`: start a local Ray (or join one), deploy the application (whose router
replicas run the gRPC gateway and /metrics), wait until it serves, and stop everything cleanly on
Ctrl-C / SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from multimed.models.bundle import load_bundle
from multimed.models.errors import BundleError
from multimed.services.app import build
from multimed.services.config import GATEWAY_RESOURCE, ROUTER, AppArgs, ServeConfigFile

log = logging.getLogger("multimed.server")

LOCAL_LOGICAL_CPUS = 16
LOCAL_GATEWAY_SLOTS = 1000  # the embedded Ray's `gateway` resource: room for any router count
SERVING_TIMEOUT_S = 600  # from replicas up to every encoder answering
# Replicas inherit these. glibc malloc's adaptive mmap threshold made batch 32 ~1.8x slower (it
# returned and refaulted batch buffers every step): a fixed 32 MiB threshold keeps batch buffers
# on the heap, while anything larger (a refused bomb's buffers) is mapped and goes back to the
# OS when freed; the heap is trimmed past 64 MiB free; two arenas, as decoding threads would
# otherwise each get one.
# Serve's replica by default runs user code on a second event loop in its own thread, and a
# handle's request router on a third: every call then crosses threads twice each way. Our
# replicas keep their loops free (decoding, forward passes and fusion run in worker threads),
# so one loop serves all three: image c=1 CPU per request 10.7 -> 9.2 ms, c=32 935 -> 1,008
# rps (bench/RESULTS.md, run H).
REPLICA_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
    "MALLOC_ARENA_MAX": "2",
    "OMP_NUM_THREADS": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # A replica's gRPC server (args.encoder_transport: grpc) takes 4 MB messages by default:
    # one coalesced batch of 2 MB studies is more. gRPC's own ceiling, 2 GiB.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),
}
DRAIN_S = 5.0  # calls in flight get this long to finish on Ctrl-C / SIGTERM


@dataclass(frozen=True)
class ServeOptions:
    config: ServeConfigFile
    ray_address: str | None = None  # None: start a local Ray; "auto": join the running one
    # The embedded Ray's dashboard (loopback, Ray's token): `serve status` reads Serve's state
    # through its REST API, so it runs by default (~120 MB, <1 % of a core idle). 0: off.
    dashboard_port: int = 8265


def ensure_bundle(path: Path) -> None:
    """Only the default bundle is trained when missing; any other path must hold a bundle, so a
    typo never serves a freshly trained model."""
    if (path / "manifest.json").exists():
        return
    if path.resolve() != Path(AppArgs().bundle).resolve():
        raise BundleError(
            f"bundle {path}: manifest.json not found (train one with `multimed train --out DIR`)"
        )
    from multimed.models.train import train_default  # training stack only when needed

    print(f"no bundle at {path}: training the default bundle (a few minutes)...", flush=True)
    train_default(path)


def wait_serving(
    url: str,
    timeout_s: float = 600,
    alive: Callable[[], bool] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
):
    """Block until the server's health check says SERVING; `alive` (e.g. a subprocess poll)
    makes a crashed server fail fast instead of timing out; `credentials`: a TLS port's."""
    deadline = time.monotonic() + timeout_s
    channel = (
        grpc.insecure_channel(url) if credentials is None else grpc.secure_channel(url, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"server for {url} exited before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"server at {url} not serving after {timeout_s:.0f} s")


async def run(options: ServeOptions) -> None:
    app_config = options.config.app
    bundle_path = Path(app_config.args.bundle)
    ensure_bundle(bundle_path)
    manifest = load_bundle(bundle_path).manifest
    # Replicas may start in other working directories (or on other nodes with shared storage).
    args = app_config.args.model_copy(
        update={
            "bundle": str(bundle_path.resolve()),
            "gateway": app_config.args.gateway.with_absolute_paths(),
        }
    )
    app_config = app_config.model_copy(update={"args": args})
    gateway = args.gateway
    url = f"{gateway.host}:{gateway.port}"

    env_vars = {**REPLICA_ENV, **app_config.runtime_env.get("env_vars", {})}
    context = ray.init(
        # "local": always a Ray of our own. Ray's default (None) joins whichever cluster the
        # host's last `ray start` recorded in /tmp/ray/ray_current_cluster, even a dead one.
        address=options.ray_address or "local",
        # Scheduling is by logical CPUs: eleven light replicas must fit on a 2-core machine.
        num_cpus=None if options.ray_address else max(os.cpu_count() or 1, LOCAL_LOGICAL_CPUS),
        resources=None if options.ray_address else {GATEWAY_RESOURCE: LOCAL_GATEWAY_SLOTS},
        include_dashboard=bool(options.dashboard_port) and not options.ray_address,
        dashboard_port=None if options.ray_address else options.dashboard_port or None,
        logging_level=logging.WARNING,
        log_to_driver=False,
        runtime_env={**app_config.runtime_env, "env_vars": env_vars},
    )
    try:
        _check_resources(app_config.deployment(ROUTER))
    except ValueError:
        ray.shutdown()
        raise
    stop = asyncio.Event()
    handles: list = []  # the router deployment's, once deployed
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        serve.start(proxy_location="Disabled")  # the gateway in the router is the front door

        def deploy() -> None:
            # The handle reaches a router replica over Ray, so waiting needs no client
            # certificate even when the port asks for one.
            replica = serve.run(build(app_config), name=app_config.name, route_prefix=None)
            handles.append(replica)
            deadline = time.monotonic() + SERVING_TIMEOUT_S
            while not replica.serving.remote().result(timeout_s=30):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not serving after {SERVING_TIMEOUT_S} s")
                time.sleep(0.5)

        # Deploying blocks until every replica is up; in a thread, so Ctrl-C still works.
        deploying = asyncio.ensure_future(asyncio.to_thread(deploy))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((deploying, stopping), return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            return
        deploying.result()
        metrics = (
            f"http://{gateway.host}:{args.metrics_port}/metrics"
            if args.metrics_port is not None
            else "off"
        )
        print(
            f"MultiMed Serve {manifest['version']} listening on {url} "
            f"({'TLS' if gateway.tls else 'plaintext'}; multimed.v1, Open Inference Protocol, "
            f"grpc.health.v1, reflection); metrics {metrics}\n"
            f"try:  multimed predict --url {url} --task medical_vqa "
            f'--text "Is there a lesion?" --xray FILE.dcm',
            flush=True,
        )
        if not options.ray_address:
            print(_ray_tools(context), flush=True)
        await stopping
        print("stopping...", flush=True)
    finally:
        if handles:
            await asyncio.to_thread(_drain, handles[0])
        if options.ray_address:
            serve.delete(app_config.name)  # a shared cluster keeps its other applications
        else:
            serve.shutdown()
        ray.shutdown()


def _ray_tools(context) -> str:
    """How Ray's own CLI reaches this embedded Ray: its GCS address (Ray's CLI would turn a
    loopback address into the host's public one unless told this Ray is local-only), its token
    mode (Ray's CLI assumes none; the token is Ray's, in ~/.ray/auth_token) and the dashboard
    that `serve status` asks."""
    env = {
        "RAY_ADDRESS": context.address_info["gcs_address"],
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    tools = "ray status, ray list actors"
    if context.dashboard_url:
        env["RAY_DASHBOARD_ADDRESS"] = f"http://{context.dashboard_url}"
        tools += f", serve status; dashboard http://{context.dashboard_url}"
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    return f"Ray's tools ({tools}):  export {exports}"


def _check_resources(router: dict) -> None:
    """Fail at once, naming the resource, when the router asks for a custom resource no node
    declares: Serve would otherwise wait for a node that never comes, silently."""
    wanted = (router.get("ray_actor_options") or {}).get("resources") or {}
    declared = ray.cluster_resources()
    for name in wanted:
        if name not in declared:
            raise ValueError(
                f"the router asks for Ray resource {name!r}, which no node of this cluster "
                f"declares: start the nodes clients connect to with "
                f"`ray start --resources='{{\"{name}\": 1}}'` (see deploy/serve_config.yaml)"
            )


def _drain(router) -> None:
    """Before the encoders go: router replicas turn NOT_SERVING, refuse new calls and give the
    ones in flight DRAIN_S to finish."""
    try:
        router.drain.remote(DRAIN_S).result(timeout_s=DRAIN_S + 10)
    except Exception as e:  # stopping anyway; say why the drain was cut short
        log.warning("drain incomplete: %s", type(e).__name__)


def serve_forever(options: ServeOptions) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    asyncio.run(run(options))
