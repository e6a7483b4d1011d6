"""A silent provider, cut: one idle timer per forwarded request, touched by every byte from the provider; when it
expires the upstream connection is closed and the client gets a provider-shaped 504 (502 when unreachable)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import http

from metrion_addon.display import REJECTED_MARK
from metrion_addon.errors import MetrionError
from metrion_addon.guard import guarded
from metrion_addon.recording import Recorder
from metrion_addon.responses import error_response
from metrion_addon.upstream import IdleTimer, answer_upstream_failures, cancel_upstream, watch_response_bodies

log = logging.getLogger(__name__)


class Timeouts:
    def __init__(self, recorder: Recorder, contain: Callable[[str, object, str], None]) -> None:
        self.recorder = recorder
        self.contain = contain  # guard.py hands a failure of the callbacks below to the addon's containment
        self._timers: dict[str, IdleTimer] = {}

    def watch(self) -> None:
        """Be told of upstream failures and of each chunk of a buffered reply (mitmproxy has no hook for them)."""
        answer_upstream_failures(self._answer_upstream_failure)
        watch_response_bodies(self._body_data)

    def start(self, flow: http.HTTPFlow, timeout: float) -> None:
        self._timers[flow.id] = IdleTimer(timeout, lambda: self._time_out(flow))

    def get(self, flow_id: str) -> IdleTimer | None:
        return self._timers.get(flow_id)

    def stop(self, flow_id: str) -> None:
        if timer := self._timers.pop(flow_id, None):
            timer.cancel()

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        answer_upstream_failures(None)
        watch_response_bodies(None)

    @guarded
    def _time_out(self, flow: http.HTTPFlow) -> None:
        exchange = self.recorder.exchanges.get(flow.id)
        if exchange is None:
            return
        exchange.timed_out = True
        if not cancel_upstream(flow):
            log.warning("metrion: flow %s timed out but had no upstream connection to close", flow.id)

    @guarded
    def _body_data(self, flow: http.HTTPFlow) -> None:
        """Any byte from the provider means it is not silent, body bytes of a buffered reply included."""
        if timer := self._timers.get(flow.id):
            timer.touch()

    @guarded
    def _answer_upstream_failure(self, flow: http.HTTPFlow, message: str) -> http.Response | None:
        exchange = self.recorder.exchanges.get(flow.id)
        config = self.recorder.runtime.config
        if exchange is None or config is None:
            return None
        if exchange.timed_out:
            error = MetrionError(504, "upstream_timeout", f"The provider did not respond within {config.timeout:g} s.")
        else:
            error = MetrionError(502, "upstream_unreachable", f"Metrion could not reach the provider: {message}")
        exchange.failure = error
        flow.marked = REJECTED_MARK
        return error_response(exchange.route.format, error, exchange)
