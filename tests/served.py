"""Servers for the tests that run in both serving modes, and raw HTTP over sockets.

The modes are one checkpoint (``--checkpoint``) and a repository of two checkpoints
(``--model-repository``, the first the default model): the connection layer and the hostile-client
answers must be the same in both, and neither may log a traceback.
"""

import json
import select
import shutil
import socket
import time
from contextlib import contextmanager

from helpers import metric_samples, running_server

MODES = ("checkpoint", "repository")


def two_model_repository(root, checkpoint):
    """``root`` holding ``checkpoint`` twice, as models "a" and "b"."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        if not (root / name).exists():
            shutil.copytree(checkpoint, root / name)
    return root


@contextmanager
def served(mode: str, checkpoint, tmp_path_factory, **settings):
    """A running server of ``checkpoint`` in ``mode``; on leaving, it is stopped and must have logged no error or traceback."""
    if mode == "checkpoint":
        server_cm = running_server(checkpoint, **settings)
    else:
        root = two_model_repository(tmp_path_factory.mktemp("repository") / "models", checkpoint)
        server_cm = running_server(None, model_repository=root, default_model="a", **settings)
    with server_cm as srv:
        srv.mode = mode
        yield srv
        no_500s(srv)
        srv.terminate()
        output = srv.proc.stdout.read()
    assert " ERROR " not in output and "Traceback" not in output, output[-3000:]


def no_500s(srv) -> None:
    fives = {
        k: v
        for k, v in metric_samples(srv).items()
        if k[0] == "codedsmooth_requests_total" and dict(k[1]).get("status") == "500"
    }
    assert not fives, fives


def metric_sum(server, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (a repository adds a ``model`` label)."""
    want = set(labels.items())
    return sum(v for (n, items), v in metric_samples(server).items() if n == name and want <= set(items))


def connect(srv, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 answer from ``sock``: status, lower-cased headers, body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` (reading and dropping what it sends)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if select.select([sock], [], [], end - time.monotonic())[0]:
            try:
                if sock.recv(65536) == b"":
                    return True
            except OSError:
                return True
    return False


def is_json_error(headers: dict, body: bytes) -> bool:
    return headers.get("content-type", "").startswith("application/json") and bool(json.loads(body)["error"])


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
