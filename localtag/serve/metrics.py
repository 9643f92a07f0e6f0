"""The server's Prometheus metrics (``GET /metrics``), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("localtag_requests", "Requests answered", ["endpoint", "http_status"], registry=r)
        self.latency = Histogram("localtag_request_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.images = Counter("localtag_images", "Images processed", ["outcome"], registry=r)
        self.batch_size = Histogram("localtag_batch_size", "Images per model batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth = Gauge("localtag_queue_depth", "Images admitted and not yet answered", registry=r)
        self.rejected = Counter("localtag_rejected", "Requests refused because the queue was full", registry=r)
        self.body_readers = Gauge("localtag_body_readers", "Request bodies being read", registry=r)
        self.timeouts = Counter("localtag_body_timeouts", "Request bodies that did not arrive in time", registry=r)
