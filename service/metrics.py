"""Prometheus metrics, one registry per app so that several apps (tests) never collide."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.batching import BatchStats
from service.repository import ModelRepository

log = logging.getLogger("camserve.batch")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Duration:
    """A count and its total time, as Triton's statistics report each stage."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    """One model's counters, in the shape of Triton's statistics extension: requests that succeeded or
    failed (with their whole duration), images inferred, batches executed (with queue and compute
    time), and the same per batch size."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)

    def on_batch(self, stats: BatchStats) -> None:
        self.inference_count += stats.size
        self.execution_count += 1
        self.queue.add(stats.queued_s)
        self.compute.add(stats.compute_s)
        self.batches.setdefault(stats.size, Duration()).add(stats.compute_s)
        self.last_inference_ms = int(time.time() * 1000)

    def on_request(self, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)


class Metrics:
    def __init__(self) -> None:
        self.stats: dict[str, ModelStats] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("camserve_requests", "HTTP requests", ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("camserve_request_seconds", "HTTP request latency", ["endpoint", "model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("camserve_batch_size", "Images per model batch", ["model"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.compute = Histogram("camserve_batch_compute_seconds", "Model time per batch", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("camserve_queue_wait_seconds", "Time the first image of a batch waited",
                                    ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("camserve_images", "Images through the model", ["model"], registry=r)
        self.queue_depth = Gauge("camserve_queue_depth", "Images waiting for a batch", ["model"], registry=r)
        self.model_ready = Gauge("camserve_model_ready", "1 while the model takes requests", ["model"], registry=r)
        self.gpu_memory = Gauge("camserve_gpu_memory_bytes", "CUDA memory allocated", ["device"], registry=r)

    def on_batch(self, model: str, stats: BatchStats) -> None:
        if log.isEnabledFor(logging.DEBUG):  # the record's fields cost more than the metrics below
            log.debug("batch of %d for %r: waited %.1f ms, computed in %.1f ms", stats.size, model,
                      stats.queued_s * 1000, stats.compute_s * 1000,
                      extra={"model": model, "batch_size": stats.size, "queued_ms": round(stats.queued_s * 1000, 2),
                             "compute_ms": round(stats.compute_s * 1000, 2)})
        self.model_stats(model).on_batch(stats)
        self.batch_size.labels(model).observe(stats.size)
        self.images.labels(model).inc(stats.size)
        self.compute.labels(model).observe(stats.compute_s)
        self.queue_wait.labels(model).observe(stats.queued_s)

    def model_stats(self, model: str) -> ModelStats:
        stats = self.stats.get(model)
        if stats is None:
            stats = self.stats[model] = ModelStats()
        return stats

    def refresh(self, repository: ModelRepository) -> None:
        """Read the gauges that are sampled rather than counted."""
        for served in repository:
            self.queue_depth.labels(served.name).set(served.batcher.queue_depth if served.batcher else 0)
            self.model_ready.labels(served.name).set(1 if served.ready else 0)
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                self.gpu_memory.labels(f"cuda:{i}").set(torch.cuda.memory_allocated(i))

    def render(self) -> bytes:
        return generate_latest(self.registry)
