"""`ServingMetrics`: what ``GET /metrics`` exports, in Prometheus' text format.

The HTTP side counts what it sees (requests by path, status and task, their latency, the queue of requests the
worker has not answered yet); the inference worker sends its own totals after every batch (`WorkerReport`), and a
restarted worker's totals are added to those of the workers before it, so counters never go down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# the worker's totals (keys of AdapterStore.stats and the API's own counts) -> (metric name, help)
WORKER_COUNTERS = {
    "batches": ("mtl_batches", "Forwards run by the inference worker"),
    "rows": ("mtl_rows", "Texts answered by the inference worker"),
    "cold_loads": ("mtl_cold_loads", "Parts (adapters, fusions) loaded into the model"),
    "cold_load_seconds": ("mtl_cold_load_seconds", "Seconds spent loading parts into the model"),
    "evictions": ("mtl_evictions", "Parts evicted to stay within serve.max_resident"),
    "swaps": ("mtl_swaps", "Resident parts replaced by a newer export"),
    "load_failures": ("mtl_load_failures", "Parts that could not be loaded"),
    "prefetch_hits": ("mtl_prefetch_hits", "Cold loads whose weights the loader thread had read ahead"),
}


class WorkerTotals:
    """A Prometheus collector of the inference worker's totals, kept across worker restarts."""

    def __init__(self) -> None:
        """No worker has reported yet."""
        self.before: dict[str, float] = {}  # totals of workers that are gone
        self.current: dict[str, float] = {}
        self.resident = 0
        self.restarts = 0

    def update(self, totals: dict[str, float], resident: int) -> None:
        """The running worker's totals as it last sent them."""
        self.current, self.resident = totals, resident

    def worker_gone(self) -> None:
        """Fold the dead worker's totals into the past ones (its successor counts from zero)."""
        for key, value in self.current.items():
            self.before[key] = self.before.get(key, 0) + value
        self.current, self.resident = {}, 0
        self.restarts += 1

    def collect(self) -> Iterator[Metric]:
        """The counters and gauges, as Prometheus scrapes them."""
        for key, (name, text) in WORKER_COUNTERS.items():
            yield CounterMetricFamily(name, text, value=self.before.get(key, 0) + self.current.get(key, 0))
        yield CounterMetricFamily("mtl_worker_restarts", "Inference workers restarted after they died",
                                  value=self.restarts)
        yield GaugeMetricFamily("mtl_resident_parts", "Parts loaded in the model now", value=self.resident)


class ServingMetrics:
    """Every metric of one server, in its own registry."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        """``queue_depth``: the number of requests sent to the worker and not answered yet."""
        self.registry = CollectorRegistry()
        self.requests = Counter("mtl_requests", "HTTP requests answered, by path, status and task",
                                ["path", "status", "task"], registry=self.registry)
        self.latency = Histogram("mtl_request_seconds", "Seconds from a request's arrival to its answer", ["path"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch_size = Histogram("mtl_batch_requests", "Requests gathered into one forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        Gauge("mtl_queue_depth", "Requests sent to the inference worker and not answered yet",
              registry=self.registry).set_function(queue_depth)
        self.worker = WorkerTotals()
        self.registry.register(self.worker)

    def observe_request(self, path: str, status: int, task: str, seconds: float) -> None:
        """One answered HTTP request."""
        self.requests.labels(path, str(status), task).inc()
        self.latency.labels(path).observe(seconds)

    def observe_batch(self, report: dict[str, Any]) -> None:
        """One batch as the worker reported it (``requests``, ``totals``, ``resident``)."""
        self.batch_size.observe(report["requests"])
        self.worker.update(report["totals"], report["resident"])

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
