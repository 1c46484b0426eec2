"""Real servers for tests: ``codedsmooth serve`` child processes on 127.0.0.1 with 2 torch threads."""

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from codedsmooth.service.launcher import LocalServer, free_port, local_server


def metric_samples(server) -> dict:
    """{(sample name, sorted label items): value} of the server's /metrics, read from its metrics port.

    ``server``: a running server (its ``metrics_url``) or the metrics base URL itself.
    """
    base = getattr(server, "metrics_url", server)
    out = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(server, name: str, **labels) -> float:
    return metric_samples(server).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for_metric(server, name: str, predicate, timeout: float = 60.0, **labels) -> float:
    """Poll a metric until ``predicate(value)`` holds (state, not sleeps, is what tests wait on)."""
    end = time.monotonic() + timeout
    while True:
        value = metric(server, name, **labels)
        if predicate(value):
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{name}{labels} = {value} did not reach the expected state in {timeout:.0f}s")
        time.sleep(0.01)


class ServerProcess(LocalServer):
    def __init__(self, checkpoint, **settings):
        super().__init__(checkpoint, threads=settings.pop("threads", 2), **settings)


def running_server(checkpoint, **settings):
    return local_server(checkpoint, threads=settings.pop("threads", 2), **settings)


__all__ = ["ServerProcess", "running_server", "free_port", "metric_samples", "metric", "wait_for_metric"]
