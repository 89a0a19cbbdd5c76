"""Prometheus metrics for `GET /metrics`: tokens, decode speed, time to first token, cache hits and misses
per layer, and the queue.

Each server owns its registry (no process-wide globals, so tests can run several). Cache counters and queue
gauges are read from the engine and the queue when scraped, so they cannot drift from what `moeplan run`
reports; the rest is recorded as each request finishes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.textgen import Completion

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter("moeplan_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("moeplan_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.requests = Counter("moeplan_requests", "Generations finished, by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.decode_speed = Gauge("moeplan_decode_tokens_per_second",
                                  "Decode tokens/s of the last generation with at least two tokens",
                                  registry=self.registry)
        self.decode_tokens = Counter("moeplan_decode_tokens", "Tokens after each generation's first "
                                     "(rate over moeplan_decode_seconds_total is the decode speed)",
                                     registry=self.registry)
        self.decode_seconds = Counter("moeplan_decode_seconds", "Time spent decoding after the first token",
                                      registry=self.registry)
        self.first_token = Histogram("moeplan_time_to_first_token_seconds",
                                     "From the request's arrival to its first generated token (queue wait included)",
                                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                     registry=self.registry)

    def watch(self, cache_stats: Callable[[], dict[str, Any]], waiting: Callable[[], int],
              running: Callable[[], int]) -> None:
        """Read the engine's cache counters and the queue at each scrape (once the model has loaded)."""
        self.registry.register(_LiveCollector(cache_stats, waiting, running))

    def finished(self, completion: Completion, arrived_at: float | None = None) -> None:
        """Record one finished generation; `arrived_at` is the request's time.perf_counter() on arrival."""
        self.requests.labels(completion.finish_reason or "error").inc()
        self.tokens.inc(completion.completion_tokens)
        if completion.first_token_at is None:
            return
        self.prompt_tokens.inc(completion.prompt_tokens)
        if arrived_at is not None:
            self.first_token.observe(completion.first_token_at - arrived_at)
        if completion.completion_tokens >= 2 and completion.last_token_at is not None:
            self.decode_tokens.inc(completion.completion_tokens - 1)
            self.decode_seconds.inc(completion.last_token_at - completion.first_token_at)
            self.decode_speed.set(completion.decode_tokens_per_s)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, cache_stats: Callable[[], dict[str, Any]], waiting: Callable[[], int],
                 running: Callable[[], int]) -> None:
        self.cache_stats, self.waiting, self.running = cache_stats, waiting, running

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily("moeplan_cache_hits", "Expert cache hits per MoE layer", labels=["layer"])
        misses = CounterMetricFamily("moeplan_cache_misses", "Expert cache misses per MoE layer", labels=["layer"])
        for index, layer in enumerate(self.cache_stats()["cache"]["per_layer"]):
            hits.add_metric([str(index)], layer["hits"])
            misses.add_metric([str(index)], layer["misses"])
        yield hits
        yield misses
        yield GaugeMetricFamily("moeplan_queue_length", "Requests waiting behind the running one",
                                value=self.waiting())
        yield GaugeMetricFamily("moeplan_requests_running", "Generations running (0 or 1)", value=self.running())
