"""Prometheus metrics of one server process, in a registry of its own.

One uvicorn worker per device is the supported layout: the micro-batcher only
batches what one process sees, and each worker would hold its own model copy,
so several workers split batches and memory without adding compute. Hence no
multiprocess mode; scale out with more containers/devices instead.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SHARE_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.97, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("codedsmooth_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("codedsmooth_request_latency_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("codedsmooth_queue_wait_seconds", "time from arrival to the start of the request's device batch", buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("codedsmooth_inference_seconds", "model time per device batch", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("codedsmooth_batch_size", "items per device batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("codedsmooth_batch_requests", "requests per device batch", buckets=SIZE_BUCKETS, registry=r)
        self.in_flight = Gauge("codedsmooth_requests_in_flight", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge("codedsmooth_queue_depth", "requests waiting for the model", registry=r)
        self.rejected = Counter("codedsmooth_rejected_total", "requests refused or dropped before compute", ["reason"], registry=r)
        self.ready = Gauge("codedsmooth_model_ready", "1 when the model is loaded and warm", registry=r)
        self.rci_groups = Histogram("codedsmooth_rci_coding_groups", "coding groups per device batch", buckets=SIZE_BUCKETS, registry=r)
        self.rci_filler_share = Histogram("codedsmooth_rci_filler_share", "share of coded slots filled with trusted filler", buckets=SHARE_BUCKETS, registry=r)
        self.rci_checked = Counter("codedsmooth_rci_checked_items_total", "items also run without RCI to measure its effect", registry=r)
        self.rci_flips = Counter("codedsmooth_rci_label_flips_total", "checked items whose RCI label differs from the uncoded model's", registry=r)
        self.rci_residual = Gauge("codedsmooth_rci_decode_residual", "mean squared gap between RCI and uncoded logits in the last checked batch", registry=r)
