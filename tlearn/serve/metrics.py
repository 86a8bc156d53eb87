"""The server's Prometheus metrics (the ``prometheus-client`` package), served as text at ``GET /metrics``:

- ``tlearn_requests_total{route, status}``: requests answered;
- ``tlearn_request_seconds{route}``: their latency, a histogram;
- ``tlearn_batch_images``: images in each model call, a histogram (how well concurrent requests are batched);
- ``tlearn_queue_images``: images admitted and not yet answered (the backpressure queue of ``--max-queue``);
- ``tlearn_rejected_total{reason}``: requests turned away at once (``busy``: the queue was full);
- ``tlearn_model_info{model_id, backbone, runtime}``: 1, naming the served model.

Each app has its own registry. Under ``tlearn serve --processes N`` the processes share a folder of metric files
(``PROMETHEUS_MULTIPROC_DIR``, set before they start), and a scrape answered by any one of them sums them all.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as shared

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self, about: dict[str, Any], runtime: str):
        self.registry = CollectorRegistry()
        self.shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        on = {"registry": self.registry}
        self.requests = Counter("tlearn_requests", "HTTP requests answered", ["route", "status"], **on)
        self.latency = Histogram("tlearn_request_seconds", "HTTP request latency in seconds", ["route"],
                                 buckets=LATENCY_BUCKETS, **on)
        self.batch = Histogram("tlearn_batch_images", "images in each model call", buckets=BATCH_BUCKETS, **on)
        self.queue = Gauge("tlearn_queue_images", "images admitted and not yet answered", multiprocess_mode="livesum",
                           **on)
        self.rejected = Counter("tlearn_rejected", "requests turned away at once", ["reason"], **on)
        info = Gauge("tlearn_model_info", "the served model", ["model_id", "backbone", "runtime"],
                     multiprocess_mode="max", **on)
        info.labels(str(about.get("model_id")), str(about.get("backbone")), runtime).set(1)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def text(self) -> bytes:
        """Prometheus' text format: this process's metrics, or every server process's under ``--processes``."""
        if not self.shared:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        shared.MultiProcessCollector(registry)
        return generate_latest(registry)
