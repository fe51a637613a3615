"""Ray's own tools against `multimed serve`'s embedded Ray, as its startup message tells a user
to run them: `ray status`, `serve status` and the dashboard (behind Ray's token)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from multimed.models.catalog import CATALOG
from multimed.services.config import DEPLOYMENT_NAMES

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_env(server) -> dict[str, str]:
    """The environment the server's "Ray's tools" line says to export."""
    line = next(
        line for line in server.log.read_text().splitlines() if line.startswith("Ray's tools")
    )
    exports = shlex.split(line.split("export ", 1)[1])
    told = dict(item.split("=", 1) for item in exports)
    assert told["RAY_ADDRESS"].startswith("127.0.0.1:"), "the embedded Ray is loopback only"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, **told}


def _run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_ray_status_sees_the_embedded_ray(ray_env):
    out = _run([str(BIN / "ray"), "status"], ray_env)
    assert "Active:" in out and "1 node_" in out
    assert "gateway" in out, "the node declares the resource the router is pinned to"


def test_serve_status_lists_every_deployment_healthy(ray_env):
    status = yaml.safe_load(_run([str(BIN / "serve"), "status"], ray_env))
    app = status["applications"]["multimed"]
    assert app["status"] == "RUNNING"
    # Every deployment but OCT's encoder, which the session's server runs in the router.
    assert set(app["deployments"]) == set(DEPLOYMENT_NAMES) - {"encoder-oct"}
    assert len(DEPLOYMENT_NAMES) == len(CATALOG.modalities) + 1
    for name, deployment in app["deployments"].items():
        assert deployment["status"] == "HEALTHY", name
        assert deployment["replica_states"].get("RUNNING", 0) >= 1, name


def test_dashboard_wants_rays_token(ray_env):
    version = f"{ray_env['RAY_DASHBOARD_ADDRESS']}/api/version"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(version, timeout=10)
    assert refused.value.code == 401
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(version, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
        assert b"ray_version" in answer.read()


def test_serve_refuses_a_router_no_node_can_host(server, tmp_path):
    """A router pinned to a resource no node declares fails at once, naming it and how to
    declare it, instead of Serve waiting silently for a node that never comes."""
    from servers import free_port, serve_config

    config = serve_config(tmp_path / "serve_config.yaml", server.bundle)
    raw = yaml.safe_load(config.read_text())
    router = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "router")
    router["ray_actor_options"]["resources"] = {"edge-gateway": 0.001}
    config.write_text(yaml.safe_dump(raw))
    command = [str(BIN / "multimed"), "serve", "--config", str(config)]
    command += ["--port", str(free_port()), "--metrics-port", str(free_port())]
    done = subprocess.run(
        [*command, "--dashboard-port", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "'edge-gateway', which no node of this cluster declares" in done.stderr
    assert """ray start --resources='{"edge-gateway": 1}'""" in done.stderr
