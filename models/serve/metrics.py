"""Prometheus metrics of one server: what `/metrics` shows.

Why a registry per server (not prometheus_client's global one): tests and the Ray deployment
build several apps in one process, and each must count only its own requests.

Names follow vLLM's where one exists (prefix `tensorgpu:`), so dashboards built for it read ours:
  tensorgpu:http_requests_total{endpoint, status}   every HTTP request, by route and status code
  tensorgpu:request_success_total{finished_reason}  engine requests that ended (stop, length, cancelled, error)
  tensorgpu:prompt_tokens_total / generation_tokens_total
  tensorgpu:num_requests_running / num_requests_waiting   (read from the engine at scrape time)
  tensorgpu:batch_size          histogram: sequences decoded per engine step (Engine.listeners)
  tensorgpu:step_seconds        histogram: wall time of one engine step
  tensorgpu:time_to_first_token_seconds / inter_token_latency_seconds / e2e_request_latency_seconds
"""
from __future__ import annotations

import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServerMetrics", "RequestTimer", "CONTENT_TYPE_LATEST"]

P = "tensorgpu:"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, max_batch: int = 64):
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(P + "http_requests", "HTTP requests by route and status code",
                                     ["endpoint", "status"], registry=r)
        self.finished = Counter(P + "request_success", "Engine requests that ended, by finish reason",
                                ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens submitted to the engine", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated and received", registry=r)
        self.running = Gauge(P + "num_requests_running", "Sequences the engine is decoding", registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests queued for a batch slot", registry=r)
        buckets, b = [], 1
        while b < max_batch:
            buckets.append(b)
            b *= 2
        buckets.append(max_batch)
        self.batch_size = Histogram(P + "batch_size", "Sequences decoded together in one engine step",
                                    buckets=buckets, registry=r)
        self.step_seconds = Histogram(P + "step_seconds", "Wall time of one engine step (decode and prefill)",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "From submission to the first token received",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Between two tokens of one request, as received",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "From submission to the final event",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def attach(self, engine) -> None:
        """Read the engine's queue depths at scrape time and its steps as they happen."""
        self.running.set_function(lambda: engine.stats()["running"])
        self.waiting.set_function(lambda: engine.stats()["waiting"])
        engine.listeners.append(self.on_step)

    def detach(self, engine) -> None:
        try:
            engine.listeners.remove(self.on_step)
        except ValueError:
            pass

    def on_step(self, info) -> None:
        """Engine.listeners callback (engine thread; prometheus_client is thread-safe)."""
        if info.batch_size:
            self.batch_size.observe(info.batch_size)
        self.step_seconds.observe(info.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency of one engine request as the server receives its tokens."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int):
        self.m = metrics
        self.start = self.last = time.monotonic()
        self.first: Optional[float] = None
        metrics.prompt_tokens.inc(prompt_tokens)

    def token(self) -> None:
        t = time.monotonic()
        if self.first is None:
            self.first = t
            self.m.ttft.observe(t - self.start)
        else:
            self.m.itl.observe(t - self.last)
        self.last = t
        self.m.generation_tokens.inc()

    def finish(self, reason: Optional[str]) -> None:
        self.m.finished.labels(reason or "cancelled").inc()
        self.m.e2e.observe(time.monotonic() - self.start)


class HTTPMetricsMiddleware:
    """ASGI middleware counting every HTTP request by route and response status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [None]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                        "/metrics") else "other"
            # a response cut off before it started (client gone, shutdown) counts as 499, nginx's code
            self.metrics.http_requests.labels(endpoint, str(status[0] or 499)).inc()
