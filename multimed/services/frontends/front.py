"""A native front before the gRPC listener: nginx (Debian's `nginx-light`), one per router
replica, on the gateway's public address. It refuses calls past `max_calls` open at once with
RESOURCE_EXHAUSTED in C. The Python listener takes calls one per event-loop turn; past ~1,000
waiting, gRPC core drops them itself and the client sees CANCELLED. At ten times capacity on two
cores that was most calls, and the front makes it none (bench/RESULTS.md). It also ends TLS.
Behind it the listener serves a unix socket in a directory only this process's user can enter;
health calls pass unlimited, so probes still answer under overload."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from multimed.services.config import GatewaySettings

log = logging.getLogger("multimed.front")
START_S = 10.0  # for nginx to listen

# Timeouts are the longest a stream may live: nginx's defaults (60 s between two reads) would
# cut a quiet PredictStream or a health Watch.
CONFIG = """\
{user}worker_processes 1;
worker_priority {priority};
daemon off;
pid {run}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    # gRPC metadata keys may hold underscores.
    underscores_in_headers on;
    ignore_invalid_headers off;
    # One counter for every call, whoever sends it.
    map $host $every_call {{ default all; }}
    limit_conn_zone $every_call zone=calls:1m;
    upstream listener {{
        server unix:{socket};
        keepalive {max_calls};
        keepalive_requests 1000000000;
    }}
    server {{
        listen {host}:{port} http2 reuseport{ssl};
{tls}        keepalive_requests 1000000000;
        # Calls past max_calls must reach nginx to be refused: a lower stream limit would hold
        # them in the client until their deadline.
        http2_max_concurrent_streams {max_streams};
        client_max_body_size 0;  # the listener checks each message's size
        # No request body before nginx takes the call: a refused call's body would be read and
        # skipped, and past 7 skipped bytes in 8 nginx closes the connection as a flood, failing
        # the calls it had accepted (UNAVAILABLE). The cost: one round trip before a body.
        http2_body_preread_size 0;
        client_body_timeout {stream_s}s;
        send_timeout {stream_s}s;
        grpc_read_timeout {stream_s}s;
        grpc_send_timeout {stream_s}s;
        location /grpc.health.v1.Health/ {{
            grpc_pass grpc://listener;
        }}
        location / {{
            limit_conn calls {max_calls};
            limit_conn_status 429;
            limit_conn_log_level info;
            error_page 429 = @overloaded;
            grpc_pass grpc://listener;
        }}
        location @overloaded {{
            default_type application/grpc;
            add_header grpc-status 8 always;
            add_header grpc-message "{refusal}" always;
            return 204;
        }}
    }}
}}
"""


def render(settings: GatewaySettings, socket_path: Path, run: Path) -> str:
    """nginx's configuration for these gateway settings, forwarding to `socket_path`."""
    front = settings.front
    assert front is not None
    tls = ""
    if settings.tls is not None:
        tls = (
            f"        ssl_certificate {settings.tls.cert};\n"
            f"        ssl_certificate_key {settings.tls.key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        )
    # Started by root, nginx would run its worker as nobody, who cannot enter the socket's
    # directory: the worker keeps the replica's user (it holds nothing the listener does not).
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    return CONFIG.format(
        user=user,
        priority=front.priority,
        run=run,
        # nginx counts client connections, each HTTP/2 stream, and upstream connections; when
        # few are left it closes idle ones (a GOAWAY to clients).
        connections=4 * (settings.max_connections + settings.max_rpcs + front.max_calls),
        max_streams=settings.max_rpcs,
        socket=socket_path,
        max_calls=front.max_calls,
        host=settings.host,
        port=settings.port,
        ssl=" ssl" if settings.tls is not None else "",
        tls=tls,
        stream_s=int(settings.max_stream_s) + 1,
        refusal=f"server overloaded: {front.max_calls} calls in progress; retry with backoff",
    )


def _parent(proc: Path) -> int | None:
    try:  # /proc/PID/stat: after the command's closing parenthesis, state then ppid
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None  # not a process, or gone


class Front:
    """A running nginx before a listener; `upstream()` is the address the listener must serve."""

    def __init__(self, settings: GatewaySettings):
        if settings.front is None:
            raise ValueError("no front configured")
        self.settings = settings
        self.run = Path(tempfile.mkdtemp(prefix="multimed-front-"))  # mode 0700
        self.socket = self.run / "listener.sock"
        self.process: subprocess.Popen | None = None

    def upstream(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> None:
        """Starts nginx and waits until it listens; a refused configuration or a busy port is an
        error that quotes nginx."""
        binary = shutil.which(self.settings.front.nginx)
        if binary is None:
            raise RuntimeError(
                f"gateway.front needs nginx ({self.settings.front.nginx!r} not found; Debian: "
                "apt-get install nginx-light)"
            )
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise RuntimeError("gateway.front needs setpriv (Debian: util-linux)")
        conf = self.run / "nginx.conf"
        conf.write_text(render(self.settings, self.socket, self.run))
        nginx = [binary, "-p", str(self.run), "-c", str(conf), "-e", "stderr"]
        checked = subprocess.run([*nginx, "-t", "-q"], capture_output=True, text=True)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx refused the front's configuration: {checked.stderr.strip()}")
        # nginx logs to the replica's stderr (Ray's replica log). setpriv gives it SIGTERM
        # (nginx's fast shutdown) when the replica dies, even by SIGKILL, so no orphan keeps the
        # port; the signal follows the thread that started it, the replica's event-loop thread,
        # which lives as long as the replica. No Python runs between fork and exec: a
        # preexec_fn forced a plain fork(), and with gRPC's threads busy its child now and then
        # aborted before exec (CI: "nginx did not start (exit -6)").
        self.process = subprocess.Popen([setpriv, "--pdeathsig", "TERM", "--", *nginx])
        deadline = time.monotonic() + START_S
        while not self._worker_started():
            if self.process.poll() is not None or time.monotonic() > deadline:
                code = self.process.poll()
                self.stop(0)
                raise RuntimeError(
                    f"nginx did not start on {self.settings.host}:{self.settings.port} (exit "
                    f"{code}); its reason is in this replica's log"
                )
            time.sleep(0.05)
        log.info("front (nginx) on %s:%d", self.settings.host, self.settings.port)

    def _worker_started(self) -> bool:
        """nginx forks its worker once its port is bound (the pid file comes earlier, while a
        busy port is still being retried); the port then takes connections."""
        if not any(_parent(child) == self.process.pid for child in Path("/proc").iterdir()):
            return False
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.settings.host, self.settings.host)
        try:
            with socket.create_connection((host, self.settings.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, grace_s: float | None) -> None:
        """SIGQUIT: nginx stops taking connections and finishes the calls it has; after
        `grace_s`, SIGTERM."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT if grace_s else signal.SIGTERM)
            try:
                self.process.wait(grace_s or 5)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                self.process.wait(5)
        shutil.rmtree(self.run, ignore_errors=True)
