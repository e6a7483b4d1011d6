"""One request's meter: the SSE tap that forwards bytes as they come, and the row the request leaves behind.

Pure code over plain data; the addon feeds it mitmproxy's flow facts and times.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .auth import Identity
from .cache import CacheEntry, CachePlan, Outcome
from .clock import iso_utc
from .errors import MetrionError
from .json_array import JSONArrayDecoder
from .redact import request_secrets, scrub
from .request_body import RequestBody, prompt_chars
from .routes import Route
from .sse import SSEDecoder
from .store import RequestRecord
from .usage import StreamUsage, Usage, estimate, from_body

_GENERATIVE = ("messages", "chat", "responses", "generate")
CLIENT_DISCONNECTED = "client disconnected before the response finished"


@dataclass
class Exchange:
    """What Metrion knows about one request while it is in flight."""

    route: Route
    path: str
    method: str
    started: float  # wall clock (possibly injected), for the row's ts
    identity: Identity | None = None
    requester: str | None = None
    request: RequestBody | None = None
    hide_usage_chunk: bool = False
    limit_headers: dict[str, str] = field(default_factory=dict)
    stream: StreamUsage | None = None
    timed_out: bool = False
    failure: MetrionError | None = None  # Metrion answered instead of the provider
    forwarded: bool = False  # sent on to the provider: its row is never dropped
    cache: CachePlan | None = None  # the request asked for the response cache
    cache_hit: CacheEntry | None = None  # ... and was answered from it
    cache_told: Outcome | None = None  # the x-metrion-cache header the client was sent
    internal_error: str | None = None  # Metrion's own code failed while metering the answer (guard.describe)
    # Where the request's credentials are, as (headers, path): worked out (secrets()) only when an error must be
    # scrubbed of them, which few requests need.
    secret_sources: tuple[tuple[Mapping[str, str], str], ...] = field(default=(), repr=False)

    def secrets(self) -> tuple[str, ...]:
        """The request's credentials (the client's and the stored key it was sent with), longest first."""
        found = {secret for headers, path in self.secret_sources for secret in request_secrets(headers, path)}
        return tuple(sorted(found, key=len, reverse=True))


class StreamTap:
    """mitmproxy's `response.stream` callback: forward each chunk at once, meter a parsed copy.

    When Metrion asked for usage the client did not, whole events are forwarded as they complete, minus the
    usage-only chunk. Never returns b"" mid-stream: an empty chunk would end a chunked body.
    """

    def __init__(self, meter: StreamUsage, hide_usage_chunk: bool, on_data: Callable[[], None]) -> None:
        self.meter = meter
        self._hide = hide_usage_chunk
        self._on_data = on_data
        self._decoder = SSEDecoder()
        self.held_back = b""  # bytes received before this call and not forwarded yet (hidden mode only)

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        self._on_data()
        if self._hide:
            self.held_back = self._decoder.pending
        if not data:
            rest = self._decoder.pending if self._hide else b""
            for event in self._decoder.close():
                self.meter.feed(event)
            return [rest] if rest else []
        events = self._decoder.feed(data)
        if not self._hide:
            for event in events:
                self.meter.feed(event)
            return data
        kept = [event.raw for event in events if not self.meter.feed(event)]
        return [b"".join(kept)] if kept else []


class ArrayTap:
    """`response.stream` for Gemini's streamed JSON array: forward each chunk untouched, meter each element."""

    def __init__(self, meter: StreamUsage, on_data: Callable[[], None]) -> None:
        self.meter = meter
        self._on_data = on_data
        self._decoder = JSONArrayDecoder()
        self.held_back = b""  # every chunk is forwarded as it comes

    def __call__(self, data: bytes) -> bytes:
        self._on_data()
        for element in self._decoder.feed(data):
            if isinstance(element, dict):
                self.meter.feed_object(element)
        if self._decoder.closed:
            self.meter.complete = True
        return data


def stream_tap(
    exchange: Exchange, status: int, content_type: str, on_data: Callable[[], None]
) -> StreamTap | ArrayTap | None:
    """The tap that streams and meters this response, or None to let mitmproxy buffer it (plain JSON)."""
    route, content_type = exchange.route, content_type.lower()
    if content_type.startswith("text/event-stream"):
        exchange.stream = StreamUsage(route.provider, route.api)
        return StreamTap(exchange.stream, exchange.hide_usage_chunk, on_data)
    if route.streams_json_array and 200 <= status < 300 and "json" in content_type:
        exchange.stream = StreamUsage(route.provider, route.api)
        return ArrayTap(exchange.stream, on_data)
    return None


def disconnect_error(exchange: Exchange) -> str | None:
    """A client that leaves after the provider's terminal event (the openai SDK closes on `[DONE]`) ended normally."""
    return None if exchange.stream is not None and exchange.stream.complete else CLIENT_DISCONNECTED


def _completion_chars(body: bytes) -> int:
    """Characters of generated text in a JSON reply that carried no usage."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return 0
    keys = ("choices", "content", "output", "candidates")
    total, stack = 0, [parsed.get(key) for key in keys] if isinstance(parsed, dict) else []
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key in ("content", "text", "arguments") and isinstance(value, str):
                    total += len(value)
                elif isinstance(value, list | dict):
                    stack.append(value)
    return total


def measured_usage(
    exchange: Exchange, status: int | None, body: bytes | None
) -> tuple[str | None, Usage | None, str]:
    """(model, usage, usage_source) for a finished or broken exchange.

    A generative endpoint whose successful reply carries no usage (or a stream cut before it) gets an estimate;
    `none` is for endpoints that have no usage and for answers that generated nothing (errors).
    """
    api, provider = exchange.route.api, exchange.route.provider

    def prompt() -> int:  # read only for an estimate: most answers carry their usage
        return prompt_chars(exchange.request.parsed if exchange.request else None)

    if exchange.stream is not None:
        meter = exchange.stream
        if meter.final:
            return meter.model, meter.usage, "provider"
        if meter.usage or meter.completion_chars or api in _GENERATIVE:
            return meter.model, estimate(prompt(), meter.completion_chars, meter.usage), "estimated"
        return meter.model, None, "none"
    model, usage = from_body(provider, body) if body else (None, None)
    if usage is not None:
        return model, usage, "provider"
    if status is not None and 200 <= status < 300 and api in _GENERATIVE:
        return model, estimate(prompt(), _completion_chars(body) if body else 0), "estimated"
    return model, None, "none"


def build_record(
    exchange: Exchange,
    *,
    status: int | None,
    body: bytes | None,
    latency_ms: float | None,
    ttfb_ms: float | None,
    error: str | None,
    flow_id: str | None = None,
) -> RequestRecord:
    model, usage, source = measured_usage(exchange, status, body)
    usage = usage or Usage()
    if error is None and exchange.stream is not None and exchange.stream.error:
        error = f"provider error in stream: {exchange.stream.error}"
    if exchange.internal_error:
        error = _internal(exchange.internal_error) + (f"; {error}" if error else "")
    if error:
        error = scrub(error, exchange.secrets())  # providers quote the rejected key back
    requested = (exchange.request.model if exchange.request else None) or exchange.route.model
    stream = exchange.stream is not None or bool(exchange.request and exchange.request.stream)
    return RequestRecord(
        ts=iso_utc(exchange.started),
        token_name=exchange.identity.token_name if exchange.identity else None,
        requester=exchange.requester,
        provider=exchange.route.provider,
        model=model or requested,
        requested_model=requested,
        path=exchange.path,
        method=exchange.method,
        stream=stream,
        status=status,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        total_tokens=usage.total_tokens,
        latency_ms=None if latency_ms is None else round(latency_ms, 1),
        ttfb_ms=None if ttfb_ms is None else round(ttfb_ms, 1),
        usage_source=source,
        error=error,
        auth_mode=exchange.identity.mode if exchange.identity else None,
        flow_id=flow_id,
        forwarded=exchange.forwarded,
    )


def fallback_record(exchange: Exchange, status: int | None, internal_error: str) -> RequestRecord:
    """The row of an exchange whose metering failed: who, where and what happened, no usage."""
    failure = f"; {exchange.failure.message}" if exchange.failure else ""
    return RequestRecord(
        ts=iso_utc(exchange.started),
        token_name=exchange.identity.token_name if exchange.identity else None,
        requester=exchange.requester,
        provider=exchange.route.provider,
        model=exchange.request.model if exchange.request else None,
        path=exchange.path,
        method=exchange.method,
        stream=exchange.stream is not None,
        status=status,
        error=_internal(exchange.internal_error or internal_error) + failure,
        auth_mode=exchange.identity.mode if exchange.identity else None,
    )


def _internal(description: str) -> str:
    return f"Metrion internal error while metering ({description}); usage not recorded"


def summary(record: RequestRecord) -> str:
    """The one-line flow comment mitmweb shows."""
    parts = [record.provider, record.model or "?"]
    if record.usage_source != "none":
        estimated = " (est.)" if record.usage_source == "estimated" else ""
        parts.append(f"{record.input_tokens} in / {record.output_tokens} out{estimated}")
    if record.cost_usd is not None:
        parts.append(f"${record.cost_usd:.6f}".rstrip("0").rstrip(".") if record.cost_usd else "$0")
    if record.latency_ms is not None:
        parts.append(f"{record.latency_ms:.0f} ms")
    if record.error:
        parts.append(record.error)
    return " · ".join(parts)


def metadata(record: RequestRecord) -> dict:
    """The row as plain data for flow.metadata["metrion"] (filterable with ~meta in mitmweb)."""
    return {
        "token": record.token_name,
        "requester": record.requester,
        "provider": record.provider,
        "model": record.model,
        "requested_model": record.requested_model,
        "status": record.status,
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "cache_read_tokens": record.cache_read_tokens,
        "cache_write_tokens": record.cache_write_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "total_tokens": record.total_tokens,
        "usage_source": record.usage_source,
        "cost_usd": record.cost_usd,
        "latency_ms": record.latency_ms,
        "ttfb_ms": record.ttfb_ms,
        "error": record.error,
    }
