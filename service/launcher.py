"""Start ``codedsmooth serve`` as a child process on 127.0.0.1 and a free port (report, benchmarks, tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``settings`` are serve options by name (``rci=False`` → ``--no-rci``, ``max_batch_size=8`` → ``--max-batch-size 8``).

    The public API is at ``url``; Prometheus metrics at ``metrics_url`` (its own port on 127.0.0.1).
    """

    def __init__(
        self,
        checkpoint=None,
        log_level: str = "warning",
        capture_output: bool = True,
        program: list[str] | None = None,
        **settings,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = settings.pop("metrics_port", None) or free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        # ``program``: another entry point taking the same arguments (tests run servers with engine doubles)
        args = [
            *(program or [sys.executable, "-m", "codedsmooth.cli"]),
            "--log-level",
            log_level,
            "serve",
            "--port",
            str(self.port),
        ]
        args += ["--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port)]
        if checkpoint is not None:
            args += ["--checkpoint", str(checkpoint)]
        for key, value in settings.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is False:
                args.append("--no-" + key.replace("_", "-"))
            elif value is not None:
                args += [flag, str(value)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CODEDSMOOTH_")}
        out = subprocess.PIPE if capture_output else None
        self.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT if capture_output else None, text=True, env=env
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                output = self.proc.stdout.read() if self.proc.stdout else ""
                raise RuntimeError(f"server exited with {self.proc.returncode}: {output}")
            try:
                r = httpx.get(self.url + "/health/ready", timeout=1)
                # this server's own answer: another process that took the port between free_port() and the
                # bind (a second server's metrics listener, say) answers something else
                if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
                    if r.json().get("status") == "ok":
                        return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server at {self.url} not ready after {timeout:.0f}s")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server drains), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


PORT_TAKEN = "already in use"  # serve's one-line error when it cannot bind a port
START_ATTEMPTS = 3


@contextmanager
def local_server(checkpoint=None, **settings):
    """A ready server; started again on other free ports when one of its ports was taken before it could bind."""
    for attempt in range(START_ATTEMPTS):
        server = LocalServer(checkpoint, **settings)
        try:
            server.wait_ready()
            break
        except RuntimeError as exc:
            server.terminate()
            if PORT_TAKEN not in str(exc).lower() or attempt == START_ATTEMPTS - 1:
                raise
        except BaseException:
            server.terminate()
            raise
    try:
        yield server
    finally:
        server.terminate()
