"""``codedsmooth serve --replicas N`` as a child process, and what tests read from it.

Ray streams every replica's log to the driver, so the child's output is read continuously on a
thread (a full pipe would stall the server); tests look for log lines in ``lines``.

Client-side outcomes are classified by :func:`outcome`: an HTTP status code (int), or for a
request that got no HTTP answer, ``"connect"`` (the connection was refused: nobody listens, the
request never reached the server) or ``"dropped"`` (the connection closed or failed after the
request was sent, without an answer). Tests state which of these each phase allows.
"""

from __future__ import annotations

import json
import re
import threading

import httpx
from helpers import metric_samples, wait_until

from codedsmooth.service.launcher import LocalServer


class RayServer(LocalServer):
    def __init__(self, checkpoint, **settings):
        settings.setdefault("threads", 1)
        super().__init__(checkpoint, log_level="info", **settings)
        self.replicas = settings.get("replicas", 1)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 180.0) -> None:
        try:
            super().wait_ready(timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.output()[-5000:]}") from None

    def wait_line(self, pattern: str, timeout: float = 60.0) -> re.Match:
        def matched():
            found = next((m for line in self.lines if (m := re.search(pattern, line))), None)
            if found is None and self.proc.poll() is not None and not self._reader.is_alive():
                raise TimeoutError(f"server exited with no line matching {pattern!r}; output:\n{self.output()[-5000:]}")
            return found

        try:
            return wait_until(matched, f"a line matching {pattern!r}", timeout, interval=0.05)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; output:\n{self.output()[-5000:]}") from None

    def startup_seconds(self) -> tuple[float, float]:
        """(Ray start or join, ready) in seconds, from the server's ready line."""
        m = self.wait_line(r"ray (?:started|joined) in ([\d.]+)s, ready after ([\d.]+)s")
        return float(m.group(1)), float(m.group(2))

    def drained(self) -> list[dict]:
        return json.loads(self.wait_line(r"drained \d+ replicas: (\[.*\])").group(1))

    def replica_metrics(self, count: int | None = None, spare: int = 4) -> dict[str, dict]:
        """{replica id: metric samples} of every replica metrics listener on ports metrics_port + rank."""
        out = {}
        for rank in range((count or self.replicas) + spare):
            base = f"http://127.0.0.1:{self.metrics_port + rank}"
            try:
                samples = metric_samples(base)
            except httpx.HTTPError:
                continue
            replica = {dict(labels).get("replica") for (_, labels) in samples} - {None}
            if len(replica) == 1:
                out[replica.pop()] = samples
        return out


def served(samples: dict, endpoint: str, status: str = "200") -> float:
    """Requests the samples of one replica count for ``endpoint`` and ``status``."""
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "codedsmooth_requests_total"
        and dict(labels).get("endpoint") == endpoint
        and dict(labels).get("status") == status
    )


def outcome(send) -> tuple[int | str, httpx.Response | None]:
    try:
        r = send()
        return r.status_code, r
    except httpx.ConnectError:
        return "connect", None
    except httpx.TransportError:  # RemoteProtocolError, ReadError, timeouts: sent, no answer
        return "dropped", None
