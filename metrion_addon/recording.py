"""The answer's way down, written: each finished exchange becomes one row, shown on its flow and handed to the
writer; once the writer has priced it, the flow in mitmweb shows its cost.

The exchanges in flight live here: an exchange is finished only when its row is put.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable

from mitmproxy import ctx, hooks, http

from metrion_addon import cache, store
from metrion_addon.errors import provider_error_message
from metrion_addon.guard import GuardedStream
from metrion_addon.headers import lowercase
from metrion_addon.metering import Exchange, build_record, disconnect_error, metadata, stream_tap, summary
from metrion_addon.runtime import Runtime
from metrion_addon.upstream import IdleTimer


class Recorder:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.exchanges: dict[str, Exchange] = {}  # flow id -> the exchange in flight
        self.loop: asyncio.AbstractEventLoop | None = None  # set when a UI will want the cost of written rows
        self._flows: weakref.WeakValueDictionary[str, http.HTTPFlow] = weakref.WeakValueDictionary()

    def answer_started(self, exchange: Exchange, response: http.Response, timer: IdleTimer | None,
                       on_tap_error: Callable[[str], None]) -> None:
        """The status and headers arrived: add the limit headers, then meter (and cache) the body as it streams.

        `timer` is the forwarded request's idle timer (None for Metrion's own answers): each chunk touches it.
        """
        if exchange.failure is None:  # Metrion's own answers carry these already
            limits = tuple((name.encode(), value.encode()) for name, value in exchange.limit_headers.items())
            response.headers.fields += limits
        if timer is None:
            return
        timer.touch()
        content_type = response.headers.get("content-type", "")
        if tap := stream_tap(exchange, response.status_code, content_type, timer.touch):
            response.stream = GuardedStream(tap, lambda: tap.held_back, on_tap_error)
        config = self.runtime.config
        if exchange.cache is not None and exchange.cache_hit is None and config is not None:
            exchange.cache_told = cache.outcome(exchange.cache)
            response.headers[cache.HEADER] = exchange.cache_told.value
            if exchange.stream is not None:
                response.stream = cache.StreamRecorder(response.stream, config.cache.max_entry_bytes)

    def answered(self, flow: http.HTTPFlow, exchange: Exchange, response: http.Response) -> None:
        """The whole answer (the provider's or Metrion's own) went to the client: record it, cache it if asked."""
        body = None if exchange.stream is not None else _plain_body(response)
        if exchange.failure is not None:
            error = exchange.failure.message
        elif response.status_code >= 400:
            error = f"provider: {provider_error_message(body) or response.reason}"
        else:
            error = None
        start = flow.request.timestamp_start
        # A whole answer settles at its cost; so does a connection that never opened (nothing reached the provider).
        settles = exchange.failure is None or flow.server_conn.timestamp_tcp_setup is None
        record = self.record(
            flow, exchange, status=response.status_code, body=body, error=error,
            latency_ms=((response.timestamp_end or time.time()) - start) * 1000,
            ttfb_ms=None if exchange.failure else (response.timestamp_start - start) * 1000, complete=settles,
        )
        if exchange.cache is not None and exchange.cache_hit is None:
            self._store_reply(response, exchange, record)

    def failed(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        """The exchange ended in an error (timeout, cut connection, client gone): record what is known."""
        config = self.runtime.config
        message = flow.error.msg if flow.error else "unknown error"
        if exchange.timed_out and config is not None:
            message = f"upstream silent for {config.timeout:g} s; connection closed"
        elif message == "Client disconnected.":
            message = disconnect_error(exchange)  # None once the provider's terminal event reached the client
        response = flow.response
        start = flow.request.timestamp_start
        self.record(
            flow, exchange, status=response.status_code if response else None, body=None,
            error=message, latency_ms=(time.time() - start) * 1000,
            ttfb_ms=(response.timestamp_start - start) * 1000 if response and response.timestamp_start else None,
        )

    def record(self, flow: http.HTTPFlow | None, exchange: Exchange, *, status: int | None, body: bytes | None,
               error: str | None, latency_ms: float | None = None, ttfb_ms: float | None = None,
               flow_id: str | None = None, complete: bool = False) -> store.RequestRecord:
        flow_id = flow.id if flow else flow_id
        record = build_record(exchange, status=status, body=body, latency_ms=latency_ms, ttfb_ms=ttfb_ms,
                              error=error, flow_id=flow_id)
        if exchange.cache is not None:
            record = cache.account(record, exchange.cache_told, exchange.cache_hit)
        if flow is not None:
            flow.metadata["metrion"] = metadata(record)
            flow.comment = summary(record)
            if self.loop is not None:  # a UI will want the cost once the row is priced
                self._flows[flow.id] = flow
        self.put(flow_id, record, complete)
        return record

    def put(self, flow_id: str | None, record: store.RequestRecord, complete: bool = False) -> None:
        """Hand the row to the writer; the exchange is finished only now (contain() looks for unfinished ones).

        `complete`: the provider's whole answer arrived, so the row's cost replaces its budget reservation.
        """
        self.exchanges.pop(flow_id or "", None)
        self.runtime.budgets.finish(flow_id, complete)  # before the writer can see the row
        if self.runtime.writer is not None:
            self.runtime.writer.put(record)

    def written(self, records: list[store.RequestRecord]) -> None:
        """Called on the writer thread once rows are written: count them, let alert rules look again, and show
        their cost in mitmweb."""
        self.runtime.metrics.rows_written(records)
        if self.runtime.monitor is not None:
            self.runtime.monitor.poke()
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._annotate, records)

    def _annotate(self, records: list[store.RequestRecord]) -> None:
        flows = []
        for record in records:
            flow = self._flows.pop(record.flow_id, None) if record.flow_id else None
            if flow is not None:
                flow.metadata["metrion"] = metadata(record)
                flow.comment = summary(record)
                flows.append(flow)
        if flows:
            ctx.master.addons.trigger(hooks.UpdateHook(flows))

    def _store_reply(self, response: http.Response, exchange: Exchange, record: store.RequestRecord) -> None:
        config = self.runtime.config
        assert exchange.cache is not None and config is not None
        recorder = response.stream if isinstance(response.stream, cache.StreamRecorder) else None
        body = recorder.body if recorder is not None else response.raw_content
        meter = exchange.stream
        entry = cache.entry_for(exchange.cache, record, lowercase(response.headers), body, stream=meter is not None,
                                complete=meter is None or meter.complete, now=self.runtime.clock(),
                                max_bytes=config.cache.max_entry_bytes)
        if entry is not None and self.runtime.cache is not None:
            self.runtime.cache.put(entry, record)


def _plain_body(response: http.Response) -> bytes | None:
    if "content-encoding" not in response.headers:
        return response.raw_content
    try:
        return response.content  # decoded: the provider ignored accept-encoding: identity
    except ValueError:
        return response.raw_content
