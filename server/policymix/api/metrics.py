"""Prometheus metrics with a ``model`` label (prometheus-client; one registry per app).

Request-level numbers (waiting, running, tokens, latencies) are recorded by the API as events pass
through it; engine-wide numbers (its own queue, per-policy forward counts) are read from
``engine.stats()`` at scrape time. ``model`` is only ever a served name that compiled, so clients
cannot grow the label set.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.protocol import RequestDone

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class _EngineCollector:
    """Engine-wide gauges and per-policy forward counters from ``engine.stats()``."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def collect(self):
        try:
            s = self.stats() or {}
        except Exception:  # a scrape must never fail because the engine is busy or down
            s = {}
        for key in ("running", "waiting"):
            g = GaugeMetricFamily(f"policymix_engine_{key}", f"{key.capitalize()} in the engine, all models "
                                  "(running: sequences; waiting: requests)")
            g.add_metric([], float(s.get(key, 0)))
            yield g
        c = CounterMetricFamily("policymix_policy_forwards", "Batched forward passes per policy", labels=["policy"])
        for policy, count in sorted((s.get("forwards") or {}).items()):
            c.add_metric([policy], float(count))
        yield c
        spec = s.get("speculative")
        if spec is not None:  # the names of vLLM's spec-decode counters, policymix_-prefixed
            for key, what in (("drafted", "draft"), ("accepted", "accepted")):
                c = CounterMetricFamily(f"policymix_spec_decode_num_{what}_tokens",
                                        f"Speculative decoding: {what} tokens verified against the mixture")
                c.add_metric([], float(spec[key]))
                yield c


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, Any]] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.waiting = Gauge("policymix_requests_waiting", "Requests admitted, no token yet", ["model"], registry=r)
        self.running = Gauge("policymix_requests_running", "Requests producing tokens", ["model"], registry=r)
        self.requests = Counter("policymix_requests", "Finished requests by outcome", ["model", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("policymix_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("policymix_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("policymix_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("policymix_inter_token_latency_seconds", "Time between tokens of a request",
                             ["model"], buckets=_ITL, registry=r)
        self.e2e = Histogram("policymix_e2e_request_latency_seconds", "Arrival to last token", ["model"],
                             buckets=_LATENCY, registry=r)
        if engine_stats is not None:
            r.register(_EngineCollector(engine_stats))

    def track(self, model: str) -> "RequestTracker":
        return RequestTracker(self, model)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """The metrics of one engine request: waiting -> running -> finished (exactly once)."""

    def __init__(self, m: ServerMetrics, model: str):
        self.m, self.model = m, model
        self.start = time.monotonic()
        self.last: dict[int, float] = {}  # per returned sequence: n > 1 interleaves within a step
        self.state = "waiting"
        m.waiting.labels(model).inc()

    def token(self, index: int) -> None:
        now = time.monotonic()
        if self.state == "waiting":
            self.m.waiting.labels(self.model).dec()
            self.m.running.labels(self.model).inc()
            self.m.ttft.labels(self.model).observe(now - self.start)
            self.state = "running"
        elif index in self.last:
            self.m.itl.labels(self.model).observe(now - self.last[index])
        self.last[index] = now

    def done(self, done: RequestDone) -> None:
        self.m.prompt_tokens.labels(self.model).inc(done.prompt_tokens)
        self.m.generation_tokens.labels(self.model).inc(done.completion_tokens)
        if self.state != "finished":
            self.m.e2e.labels(self.model).observe(time.monotonic() - self.start)
        self.finish("error" if done.error else "ok")

    def finish(self, outcome: str) -> None:
        """Leave the waiting/running gauges (idempotent: only the first outcome counts)."""
        if self.state == "finished":
            return
        (self.m.waiting if self.state == "waiting" else self.m.running).labels(self.model).dec()
        self.m.requests.labels(self.model, outcome).inc()
        self.state = "finished"
