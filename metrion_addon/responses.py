"""The answers Metrion makes itself: provider-shaped refusals, replays from the response cache, and its own
endpoints (GET /metrion/health for load balancers, GET /metrion/metrics for Prometheus)."""

from __future__ import annotations

import json
import time

from mitmproxy import http
from mitmproxy.net.http import status_codes

from metrion_addon import cache
from metrion_addon.display import REJECTED_MARK
from metrion_addon.errors import MetrionError, error_body, error_headers
from metrion_addon.health import health
from metrion_addon.metering import Exchange
from metrion_addon.metrics import CONTENT_TYPE
from metrion_addon.runtime import Runtime

OWN_ENDPOINTS = ("/metrion/health", "/metrion/metrics")


def error_response(error_format: str | None, error: MetrionError, exchange: Exchange | None = None) -> http.Response:
    """`error` shaped like the provider's own (`error_format`), with the exchange's limit headers."""
    headers = {**(exchange.limit_headers if exchange else {}), **error_headers(error)}
    return http.Response.make(error.status, error_body(error_format, error), headers)


def answer_with_error(flow: http.HTTPFlow, error_format: str | None, error: MetrionError,
                      exchange: Exchange | None = None) -> None:
    """Answer `flow` with `error` instead of forwarding it, marked as refused for the flow list."""
    flow.response = error_response(error_format, error, exchange)
    flow.marked = REJECTED_MARK


def replayed(replay: cache.Replay) -> http.Response:
    now = time.time()
    reason = status_codes.RESPONSES.get(replay.status, "").encode()
    return http.Response(b"HTTP/1.1", replay.status, reason, http.Headers(replay.headers), replay.body, None, now, now)


def own_endpoint(path: str, runtime: Runtime, version: str) -> http.Response:
    """The answer to one of OWN_ENDPOINTS."""
    if path == "/metrion/metrics":
        return http.Response.make(200, runtime.metrics.render(), {"content-type": CONTENT_TYPE})
    assert runtime.config is not None and runtime.writer is not None
    writer, shared = runtime.writer, runtime.shared
    opened = runtime.log
    spool = opened.spool if opened else None
    state = health(writer_error=writer.trouble, backlog=writer.backlog,
                   database=opened.describe() if opened else "sqlite",
                   spool_rows=spool.rows if spool else 0, spool_bytes=spool.bytes if spool else 0,
                   redis_error=False if shared is None else shared.error,
                   redis_closed=shared is not None and shared.on_failure == "closed", version=version)
    return http.Response.make(state.status, json.dumps(state.body).encode(),
                              {"content-type": "application/json", "cache-control": "no-store"})
