"""Real servers for tests: ``codedsmooth serve`` child processes on 127.0.0.1 with 2 torch threads."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

from codedsmooth.service.launcher import LocalServer, free_port, local_server


def metric_samples(url: str) -> dict:
    """{(sample name, sorted label items): value} of the server's /metrics."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class ServerProcess(LocalServer):
    def __init__(self, checkpoint, **settings):
        super().__init__(checkpoint, threads=settings.pop("threads", 2), **settings)


def running_server(checkpoint, **settings):
    return local_server(checkpoint, threads=settings.pop("threads", 2), **settings)


__all__ = ["ServerProcess", "running_server", "free_port", "metric_samples"]
