"""Prometheus metrics of one server process, in a registry of its own.

One uvicorn worker per device is the supported layout: the micro-batcher only
batches what one process sees, and each worker would hold its own model copy,
so several workers split batches and memory without adding compute. Hence no
multiprocess mode; scale out with Ray Serve replicas (each with its own registry
and listener, samples labelled ``replica``: see ``codedsmooth.service.ray.serve``)
or more containers/devices instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("codedsmooth.service")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SHARE_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.97, 1.0)


class Metrics:
    """All metric objects; the public port never serves them (see ``start_metrics_listener``).

    ``by_model`` (a model repository): the request counters and the metrics of :class:`ModelMetrics` get a
    ``model`` label, whose values are the repository's model names ("" for requests that reached
    no model), so the label is bounded by the repository. Without it (one checkpoint) the names and
    labels are exactly those of a single-model server. The request counters have a label more in
    one mode than in the other, so they are touched only through :meth:`count_request` and
    :meth:`observe_latency`, which take the labels by name.
    """

    def __init__(self, registry: CollectorRegistry | None = None, by_model: bool = False):
        self.registry = registry or CollectorRegistry()
        self.by_model = by_model
        r = self.registry
        m = ["model"] if by_model else []
        self._requests = Counter(
            "codedsmooth_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status", *m], registry=r
        )
        # every request touches these two: their series are looked up once per label values, not per request (the
        # values are bounded: routes or "unmatched", the statuses the server answers, the repository's models)
        self._request_series: dict[tuple[str, int, str | None], Any] = {}
        self._latency_series: dict[tuple[str, str | None], Any] = {}
        self._latency = Histogram(
            "codedsmooth_request_latency_seconds",
            "HTTP request latency",
            ["endpoint", *m],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "codedsmooth_queue_wait_seconds",
            "time from arrival to the start of the request's device batch",
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "codedsmooth_inference_seconds", "model time per device batch", m, buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "codedsmooth_batch_size", "items per device batch", m, buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "codedsmooth_batch_requests", "requests per device batch", m, buckets=SIZE_BUCKETS, registry=r
        )
        self.in_flight = Gauge("codedsmooth_requests_in_flight", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge(
            "codedsmooth_queue_depth",
            "accepted requests waiting for the model (queued or gathered into the next batch)",
            m,
            registry=r,
        )
        self.connections = Gauge(
            "codedsmooth_open_connections", "open client connections on the public port", registry=r
        )
        self.connections_evicted = Counter(
            "codedsmooth_idle_connections_closed_total",
            "connections without a request in the app closed to admit a new one at --max-connections",
            registry=r,
        )
        self.rejected = Counter(
            "codedsmooth_rejected_total", "requests refused or dropped before compute", ["reason"], registry=r
        )
        self.ready = Gauge(
            "codedsmooth_model_ready",
            "1 when the model is loaded and warm (a repository: every required model)",
            registry=r,
        )
        self.model_loaded = Gauge(
            "codedsmooth_model_loaded", "1 while a model is loaded and serving, by model name", ["model"], registry=r
        )
        # access control (with --api-keys-file); client labels come from the keys file, plus "unknown"
        self.client_requests = Counter(
            "codedsmooth_client_requests_total", "requests with a known API key, by client", ["client"], registry=r
        )
        self.client_items = Counter(
            "codedsmooth_client_items_total", "items charged to a client's limits", ["client"], registry=r
        )
        self.client_refused = Counter(
            "codedsmooth_client_refused_total",
            "requests refused by access control: 401 (client unknown: no key or an unknown one), 429 (over a limit)",
            ["client", "status"],
            registry=r,
        )
        self.keys_reloads = Counter(
            "codedsmooth_api_keys_reloads_total",
            "keys file reloads after a change: ok, empty (loaded; every request refused), or error (the last good table stays)",
            ["result"],
            registry=r,
        )
        self.keys_clients = Gauge("codedsmooth_api_keys_clients", "clients in the keys table in force", registry=r)
        self.rci_groups = Histogram(
            "codedsmooth_rci_coding_groups", "coding groups per device batch", m, buckets=SIZE_BUCKETS, registry=r
        )
        self.rci_filler_share = Histogram(
            "codedsmooth_rci_filler_share",
            "share of coded slots filled with trusted filler",
            m,
            buckets=SHARE_BUCKETS,
            registry=r,
        )
        self.rci_checked = Counter(
            "codedsmooth_rci_checked_items_total", "items also run without RCI to measure its effect", m, registry=r
        )
        self.rci_flips = Counter(
            "codedsmooth_rci_label_flips_total",
            "checked items whose RCI label differs from the uncoded model's",
            m,
            registry=r,
        )
        self.rci_residual = Gauge(
            "codedsmooth_rci_decode_residual",
            "mean squared gap between RCI and uncoded logits in the last checked batch",
            m,
            registry=r,
        )

    def _model(self, model: str | None) -> dict[str, str]:
        return {"model": model or ""} if self.by_model else {}

    def count_request(self, endpoint: str, status: int, model: str | None = None) -> None:
        """Count one answered request; ``model``: the model it was routed to (None: it reached none)."""
        key = (endpoint, status, model)
        child = self._request_series.get(key)
        if child is None:
            child = self._request_series[key] = self._requests.labels(
                endpoint=endpoint, status=str(status), **self._model(model)
            )
        child.inc()

    def observe_latency(self, endpoint: str, seconds: float, model: str | None = None) -> None:
        """Record one request's latency, labelled as :meth:`count_request` labels its count."""
        key = (endpoint, model)
        child = self._latency_series.get(key)
        if child is None:
            child = self._latency_series[key] = self._latency.labels(endpoint=endpoint, **self._model(model))
        child.observe(seconds)

    def status_counts(self) -> dict[str, dict[str, int]]:
        """Requests answered so far: {endpoint: {status: count}} (summed over models)."""
        out: dict[str, dict[str, int]] = {}
        for family in self._requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    by_status = out.setdefault(sample.labels["endpoint"], {})
                    by_status[sample.labels["status"]] = by_status.get(sample.labels["status"], 0) + int(sample.value)
        return out

    def for_model(self, name: str) -> ModelMetrics:
        """The metrics one model's batcher and engine report to (labelled with ``name`` when ``by_model``)."""
        return ModelMetrics.of(self, name)


@dataclass(frozen=True)
class ModelMetrics:
    """One model's view of :class:`Metrics`: the series of its batcher and engine (labelled with its
    name in a repository), and the shared ``rejected`` counter.

    The micro-batcher and :class:`BatchObserver` take it where they would take a ``Metrics``.
    """

    rejected: Counter
    queue_wait: Histogram
    inference: Histogram
    batch_size: Histogram
    batch_requests: Histogram
    queue_depth: Gauge
    rci_groups: Histogram
    rci_filler_share: Histogram
    rci_checked: Counter
    rci_flips: Counter
    rci_residual: Gauge

    @classmethod
    def of(cls, metrics: Metrics, name: str) -> ModelMetrics:
        def own(metric):
            return metric.labels(model=name) if metrics.by_model else metric

        m = metrics
        return cls(
            rejected=m.rejected,
            queue_wait=own(m.queue_wait),
            inference=own(m.inference),
            batch_size=own(m.batch_size),
            batch_requests=own(m.batch_requests),
            queue_depth=own(m.queue_depth),
            rci_groups=own(m.rci_groups),
            rci_filler_share=own(m.rci_filler_share),
            rci_checked=own(m.rci_checked),
            rci_flips=own(m.rci_flips),
            rci_residual=own(m.rci_residual),
        )


class BatchObserver:
    """Turns what the engine reports about each device batch into metrics (and a flip log line).

    The batcher only hands over the engine's result; which statistics are RCI's, and how they are
    counted, is known here and nowhere in the batcher.
    """

    def __init__(self, metrics: Metrics | ModelMetrics, scope: str, log_every_s: float = 60.0):
        self.metrics = metrics
        self.scope = scope
        self.log_every_s = log_every_s
        self._flips = [0, 0, time.monotonic()]  # label flips, checked items, last log time

    def __call__(self, result, seconds: float, requests: int) -> None:
        m, s = self.metrics, result.stats
        m.inference.observe(seconds)
        m.batch_size.observe(s.items)
        m.batch_requests.observe(requests)
        if s.groups:
            m.rci_groups.observe(s.groups)
            m.rci_filler_share.observe(s.filler_share)
        if s.checked_items:
            m.rci_checked.inc(s.checked_items)
            m.rci_flips.inc(s.label_flips)
            if s.decode_residual is not None:
                m.rci_residual.set(s.decode_residual)
            self._log_flips(s.label_flips, s.checked_items)

    def _log_flips(self, flips: int, checked: int) -> None:
        """At most once a minute: how often RCI (in batch scope: the batch-mates) changed a label."""
        self._flips[0] += flips
        self._flips[1] += checked
        now = time.monotonic()
        if now - self._flips[2] >= self.log_every_s:
            f, c = self._flips[0], self._flips[1]
            log.info(
                "rci %s scope: %d of %d checked items changed label vs the uncoded model (%.2f%%)",
                self.scope,
                f,
                c,
                100.0 * f / c,
            )
            self._flips = [0, 0, now]


class _Labelled:
    """A collector that re-exports another registry's samples with constant labels added (e.g. ``replica``)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]):
        self.registry = registry
        self.labels = labels

    def collect(self):
        from prometheus_client.metrics_core import Metric

        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, **self.labels}, s.value, s.timestamp, s.exemplar)
            yield out


def start_metrics_listener(metrics: Metrics, host: str, port: int, labels: dict[str, str] | None = None):
    """Serve ``/metrics`` of ``metrics`` on its own address (a prometheus-client thread; no torch work).

    ``labels``: constant labels added to every sample (Ray Serve replicas add ``replica``, ``deployment``, ``app``).
    Returns the WSGI server (``server_port`` is the bound port, useful with port 0); ``shutdown()`` stops it.
    """
    from prometheus_client import start_http_server

    registry = metrics.registry
    if labels:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Labelled(metrics.registry, labels))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
