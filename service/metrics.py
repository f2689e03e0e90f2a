"""Prometheus metrics of one app instance (its own registry, so several apps in one process, as in
tests, do not collide): request latency, batcher queue time / batch size / model time, verification
decisions, OOD flags, gallery searches and enrollments, and errors by code."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from facerec.runtime import BatchInfo

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.request_latency = Histogram(
            "facerec_request_duration_seconds", "HTTP request latency, by route template and status",
            ["route", "method", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "facerec_batch_queue_seconds", "time a face waited in the micro-batcher before its batch ran",
            buckets=_QUEUE_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "facerec_batch_size", "faces per model call", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_run = Histogram(
            "facerec_batch_run_seconds", "model time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_errors = Counter("facerec_batch_errors", "model calls that raised", registry=r)
        self.decisions = Counter(
            "facerec_verify_decisions", "verification decisions", ["decision"], registry=r)
        self.ood = Counter(
            "facerec_ood_checks", "images scored by the OOD detector, by outcome", ["flagged"], registry=r)
        self.errors = Counter("facerec_errors", "error responses by error code", ["code"], registry=r)
        self.inflight = Gauge("facerec_requests_in_flight", "inference requests being served", registry=r)
        self.pending = Gauge("facerec_batch_pending_faces", "faces admitted to the batcher, not answered",
                             registry=r)
        self.ready = Gauge("facerec_ready", "1 when the model is loaded, its provider active and warm",
                           registry=r)
        self.gallery_searches = Counter(
            "facerec_gallery_searches", "gallery searches by decision", ["decision"], registry=r)
        self.gallery_samples = Counter(
            "facerec_gallery_samples", "photos offered for enrollment, by outcome", ["outcome"], registry=r)
        self.gallery_refusals = Counter(
            "facerec_gallery_refusals", "enrollment refusals by reason code", ["reason"], registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.request_latency.labels(route=route, method=method, status=str(status)).observe(seconds)

    def on_batch(self, info: BatchInfo) -> None:
        """The micro-batcher's hook (runs on the event loop after every batch)."""
        self.batch_size.observe(info.size)
        self.batch_run.observe(info.run_s)
        for wait in info.queue_wait_s:
            self.queue_wait.observe(wait)
        if info.error is not None:
            self.batch_errors.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
