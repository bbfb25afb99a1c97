"""The server's Prometheus metrics (prometheus_client, one registry per app), at ``GET /metrics``:
requests and errors by path and status, request latency, and per batch its size, the time the
model took and how long its images waited in the queue: where a request's time goes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # (a *_created sample per series: noise for a server that lives in one process)

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "minitrain_requests", "HTTP requests answered", ["path", "status"], registry=self.registry
        )
        self.errors = Counter(
            "minitrain_errors", "HTTP requests answered with an error (4xx, 5xx)", ["path", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "minitrain_request_seconds", "Time to answer POST /predict, from its headers to its answer",
            buckets=LATENCY, registry=self.registry,
        )  # fmt: skip
        sizes = sorted({2**i for i in range(max_batch.bit_length())} | {max_batch})
        self.batch = Histogram("minitrain_batch_size", "Images per model call", buckets=sizes, registry=self.registry)
        self.model = Histogram(
            "minitrain_model_seconds", "Time of one model call (a batch)", buckets=LATENCY, registry=self.registry
        )
        self.queued = Histogram(
            "minitrain_queue_seconds", "Time an image waited for its batch to start", buckets=LATENCY,
            registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "minitrain_predict_in_flight", "POST /predict requests being answered", registry=self.registry
        )
        self.images = Counter("minitrain_images", "Images classified", registry=self.registry)

    def answered(self, path: str, status: int) -> None:
        self.requests.labels(path, str(status)).inc()
        if status >= 400:
            self.errors.labels(path, str(status)).inc()

    def batched(self, size: int, seconds: float, waits: list[float]) -> None:
        self.batch.observe(size)
        self.model.observe(seconds)
        self.images.inc(size)
        for wait in waits:
            self.queued.observe(wait)

    def text(self) -> bytes:
        return generate_latest(self.registry)
