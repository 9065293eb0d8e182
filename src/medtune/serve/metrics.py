"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    """Requests by outcome, prompt and generated tokens, latency, time to first token, queue depth."""

    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medtune_requests", "chat completion requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("medtune_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("medtune_generation_tokens", "tokens generated", registry=r)
        self.latency = Histogram("medtune_request_latency_seconds", "request latency, arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("medtune_time_to_first_token_seconds", "arrival to first generated text",
                              buckets=_LATENCY_BUCKETS, registry=r)
        queue = Gauge("medtune_queue_depth", "requests waiting for a batch slot", registry=r)
        queue.set_function(lambda: engine.waiting)
        running = Gauge("medtune_running_requests", "requests in the running batch", registry=r)
        running.set_function(lambda: engine.running)

    def rejected(self) -> None:
        self.requests.labels("rejected").inc()

    def track(self, started: float) -> "Tracker":
        return Tracker(self, started)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Tracker:
    """One request's figures: first text, then the finish."""

    def __init__(self, metrics: Metrics, started: float):
        self.metrics, self.started, self.first = metrics, started, False

    def token_text(self) -> None:
        if not self.first:
            self.first = True
            self.metrics.ttft.observe(time.perf_counter() - self.started)

    def finish(self, last: Any) -> None:
        self.metrics.requests.labels(last.finish_reason or "unknown").inc()
        self.metrics.prompt_tokens.inc(last.prompt_tokens)
        self.metrics.generation_tokens.inc(last.completion_tokens)
        self.metrics.latency.observe(time.perf_counter() - self.started)
