"""Prometheus metrics, in a registry of the app's own (several apps in one process do not clash)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from model_store import kernels

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lyrics_http_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("lyrics_http_request_duration_seconds",
                                 "Time from request to the last byte of the answer (streams included)",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_chars = Counter("lyrics_generated_chars", "Characters generated and sent, by model",
                                       ["model"], registry=r)
        self.scored_chars = Counter("lyrics_scored_chars", "Characters scored by /perplexity, by model",
                                    ["model"], registry=r)
        self.compare_latency = Histogram("lyrics_compare_generation_seconds",
                                         "POST /compare: each model's generation, from submission to its last "
                                         "character, by model", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("lyrics_inflight_sequences", "Sequences being generated now", registry=r)
        self.queued = Gauge("lyrics_queued_requests", "Generations waiting for a worker", registry=r)
        self.models_loaded = Gauge("lyrics_models_loaded", "Models loaded and served", registry=r)
        self.queue_wait = Histogram("lyrics_queue_wait_seconds", "Generations: from submission to joining the "
                                    "batch, by model", ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.first_char = Histogram("lyrics_time_to_first_char_seconds", "Generations: from submission to the "
                                    "first generated character, by model", ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.char_rate = Histogram("lyrics_generation_chars_per_second", "Generations: characters generated per "
                                   "second from joining the batch to the end (all choices), by model", ["model"],
                                   buckets=RATE_BUCKETS, registry=r)
        self.batch_rows = Histogram("lyrics_batch_rows", "Rows stepped together, one observation per batch step "
                                    "(batch occupancy), by model", ["model"], buckets=ROW_BUCKETS, registry=r)
        self.errors = Counter("lyrics_errors", "Error answers by type (the error body's type)", ["type"], registry=r)
        Info("lyrics_kernels", "Which build of the C kernels runs the CPU cells (none: torch ops)",
             registry=r).info({"build": kernels.build_name()})

    def watch(self, engine, models_loaded: int) -> None:
        """Read the engine's live counts at scrape time."""
        self.in_flight.set_function(lambda: engine.in_flight)
        self.queued.set_function(lambda: engine.queued)
        self.models_loaded.set(models_loaded)
        self.registry.register(GenerationOutcomes(engine))
        engine.on_step = lambda model, rows: self.batch_rows.labels(model).observe(rows)
        engine.on_end = self.generation_ended

    def generation_ended(self, job, outcome: str) -> None:
        """A generation's timings (called on its scheduler's thread; prometheus_client is thread-safe)."""
        if job.admitted is None:
            return
        self.queue_wait.labels(job.label).observe(job.admitted - job.submitted)
        if job.first_char is not None:
            self.first_char.labels(job.label).observe(job.first_char - job.submitted)
        elapsed = time.monotonic() - job.admitted
        chars = sum(len(c.generated) for c in job.completions)
        if outcome == "completed" and chars and elapsed > 0:
            self.char_rate.labels(job.label).observe(chars / elapsed)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class GenerationOutcomes(Collector):
    """lyrics_generations_total{outcome}: the engine's finished generations, read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        family = CounterMetricFamily("lyrics_generations", "Generations finished, by outcome "
                                     "(completed, cancelled: the client went away, timeout, error)", labels=["outcome"])
        for outcome in ("completed", "cancelled", "timeout", "error"):
            family.add_metric([outcome], self.engine.finished[outcome])
        return [family]
