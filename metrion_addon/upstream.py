"""Upstream failures, answered: an idle timer that cuts a silent provider, and provider-shaped 502/504s.

mitmproxy has no upstream timeout and answers connection failures with its own HTML page, so this module
reaches into its internals (pinned to mitmproxy 12.3): it is the only one that does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mitmproxy import ctx, http, optmanager
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.layers.http._events import ResponseData, ResponseProtocolError
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook

Responder = Callable[[http.HTTPFlow, str], http.Response | None]

_responder: Responder | None = None
_on_body_data: Callable[[http.HTTPFlow], None] | None = None
_original_handle_protocol_error = HttpStream.handle_protocol_error
_original_consume_response_body = HttpStream.state_consume_response_body


def _handle_protocol_error(self: HttpStream, event):
    """Before any response byte reached the client, let the responder answer an upstream failure."""
    nothing_sent = self.server_state in (self.state_wait_for_response_headers, self.state_consume_response_body)
    if (
        _responder is not None
        and isinstance(event, ResponseProtocolError)
        and self.client_state == self.state_done
        and nothing_sent
        and (response := _responder(self.flow, event.message)) is not None
    ):
        self.response_body_buf.clear()
        response.timestamp_start = time.time()
        self.flow.response = response
        yield HttpResponseHeadersHook(self.flow)
        yield from self.send_response()
        return
    yield from _original_handle_protocol_error(self, event)


def _consume_response_body(self: HttpStream, event):
    """mitmproxy buffers a non-streamed body with no hook per chunk: report each chunk as it arrives."""
    if _on_body_data is not None and isinstance(event, ResponseData):
        _on_body_data(self.flow)
    return _original_consume_response_body(self, event)


def watch_response_bodies(on_data: Callable[[http.HTTPFlow], None] | None) -> None:
    """Call `on_data(flow)` for every chunk of a buffered (non-streamed) response body (None: stop).

    Streamed bodies go through `response.stream`, which sees every chunk already.
    """
    global _on_body_data
    _on_body_data = on_data
    HttpStream.state_consume_response_body = _consume_response_body


def answer_upstream_failures(responder: Responder | None) -> None:
    """Route connection failures and cut upstreams (before the response started) through `responder`.

    The responder gets the flow and mitmproxy's error message and returns the response to send, or None
    for mitmproxy's default. Installing again replaces the responder (script reloads do that).
    """
    global _responder
    _responder = responder
    HttpStream.handle_protocol_error = _handle_protocol_error


def connect_lazily_unless_chosen() -> None:
    """Use connection_strategy=lazy unless the user set the option: Metrion decides where a request goes.

    mitmproxy's default (eager) connects to the host a CONNECT names before any hook could route it elsewhere,
    so with the providers configured to a gateway or mock (or no internet), every HTTPS_PROXY call would get 502.
    An explicit `--set connection_strategy=eager` is respected (mitmproxy keeps unset options as `unset`).
    """
    option = ctx.options._options.get("connection_strategy")  # absent where no proxy server is loaded (tests)
    if option is not None and option.value is optmanager.unset:
        ctx.options.update(connection_strategy="lazy")


def cancel_upstream(flow: http.HTTPFlow) -> bool:
    """Close the flow's upstream connection, or abort its connection attempt; False if there is none."""
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    if handler is None:
        return False
    target = (flow.request.host, flow.request.port)
    cancelled = False
    for connection, io in list(handler.transports.items()):
        ours = connection is flow.server_conn or (
            connection is not handler.client
            and connection.address == target
            and connection.state is ConnectionState.CLOSED  # still connecting
        )
        if ours and io.handler is not None:
            io.handler.cancel("metrion: upstream timeout")
            cancelled = True
    return cancelled


class IdleTimer:
    """Calls `expire` once, after `timeout` seconds without a `touch()`."""

    def __init__(self, timeout: float, expire: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._expire = expire
        self._last = self._loop.time()
        self._handle = self._loop.call_later(timeout, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        idle = self._loop.time() - self._last
        if idle >= self._timeout:
            self._expire()
        else:
            self._handle = self._loop.call_later(self._timeout - idle, self._check)
