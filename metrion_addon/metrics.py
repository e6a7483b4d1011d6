"""Prometheus metrics of one instance: what its rows say (requests, tokens, cost, latency), refusals, its writer.

Rows are counted on the writer thread once written, so the figures match the database and cost the event loop nothing.
"""

from __future__ import annotations

from collections import Counter as Counter_
from collections import defaultdict
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .store import RequestRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST
_ROW = ("provider", "model", "token", "status")
_TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """One registry per process: a config reload keeps every counter."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("metrion_requests", "Requests recorded, by provider, model, token and status "
                                "(status 'none': no status reached the client).", _ROW, registry=registry)
        self.tokens = Counter("metrion_tokens", "Tokens recorded, by provider, model, token and kind (reasoning "
                              "tokens are part of output).", ("provider", "model", "token", "kind"), registry=registry)
        self.cost = Counter("metrion_cost_usd", "Cost of the recorded requests in USD (unpriced rows add nothing).",
                            ("provider", "model", "token"), registry=registry)
        self.unpriced = Counter("metrion_unpriced_requests", "Recorded requests whose cost is unknown.",
                                ("provider", "model"), registry=registry)
        self.latency = Histogram("metrion_request_duration_seconds", "From the request until the last byte of the "
                                 "response.", ("provider",), buckets=_SECONDS, registry=registry)
        self.ttfb = Histogram("metrion_time_to_first_byte_seconds", "From the request until the provider's response "
                              "headers.", ("provider",), buckets=_SECONDS, registry=registry)
        self.rejections = Counter("metrion_rejections", "Requests Metrion refused instead of forwarding, by kind: "
                                  "its error code (rate_limit_exceeded, budget_exceeded, limits_unavailable, ...).",
                                  ("kind",), registry=registry)
        self.cache = Counter("metrion_cache_requests", "Requests that asked for the response cache, by outcome "
                             "(HIT, MISS, REFRESH).", ("outcome",), registry=registry)
        self.saved = Counter("metrion_cache_saved_usd", "What the requests answered from the response cache cost "
                             "when they were first made, in USD.", registry=registry)
        self.backlog = Gauge("metrion_writer_backlog_rows", "Rows and counters waiting for the database writer.",
                             registry=registry)

        self.spool_rows = Gauge("metrion_spool_rows", "Rows spooled to the local journal while PostgreSQL is "
                                "unreachable, not replayed yet.", registry=registry)
        self.spool_bytes = Gauge("metrion_spool_bytes", "Size of the local journal file (PostgreSQL log only).",
                                 registry=registry)

    def watch_backlog(self, backlog: Callable[[], float]) -> None:
        self.backlog.set_function(backlog)

    def watch_spool(self, rows: Callable[[], float], size: Callable[[], float]) -> None:
        self.spool_rows.set_function(rows)
        self.spool_bytes.set_function(size)

    def rejected(self, kind: str) -> None:
        self.rejections.labels(kind).inc()

    def rows_written(self, records: Iterable[RequestRecord]) -> None:
        """Count a written batch: sums per label set first, so each metric child is touched once per batch."""
        requests: Counter_[tuple[str, ...]] = Counter_()
        tokens: Counter_[tuple[str, ...]] = Counter_()
        cost: dict[tuple[str, ...], float] = defaultdict(float)
        unpriced: Counter_[tuple[str, ...]] = Counter_()
        latency: dict[str, list[float]] = defaultdict(list)
        ttfb: dict[str, list[float]] = defaultdict(list)
        cache: Counter_[tuple[str, ...]] = Counter_()
        saved = 0.0
        for r in records:
            row = (r.provider, r.model or "", r.token_name or "")
            requests[(*row, str(r.status) if r.status is not None else "none")] += 1
            for kind in _TOKEN_KINDS:
                if count := getattr(r, f"{kind}_tokens"):
                    tokens[(*row, kind)] += count
            if r.cost_usd is not None:
                cost[row] += r.cost_usd
            elif r.usage_source != "none":
                unpriced[row[:2]] += 1
            if r.latency_ms is not None:
                latency[r.provider].append(r.latency_ms / 1000)
            if r.ttfb_ms is not None:
                ttfb[r.provider].append(r.ttfb_ms / 1000)
            if r.cache_status is not None:
                cache[(r.cache_status,)] += 1
                saved += r.saved_usd or 0.0
        if saved:
            self.saved.inc(saved)
        for metric, sums in ((self.requests, requests), (self.tokens, tokens), (self.cost, cost),
                             (self.unpriced, unpriced), (self.cache, cache)):
            for labels, amount in sums.items():
                metric.labels(*labels).inc(amount)
        for histogram, observed in ((self.latency, latency), (self.ttfb, ttfb)):
            for provider, seconds in observed.items():
                child = histogram.labels(provider)
                for value in seconds:
                    child.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
