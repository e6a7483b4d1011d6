"""What Metrion does when its own code fails on a flow (guard.py catches, this decides): a request not yet
forwarded is refused with a 500, a finished one still leaves its row, an answer under way goes on with a note."""

from __future__ import annotations

from mitmproxy import http

from metrion_addon.auth import lift_query_key, requester
from metrion_addon.errors import MetrionError
from metrion_addon.forward_proxy import ForwardProxy
from metrion_addon.headers import drop_metrion_headers, redact, redact_request
from metrion_addon.metering import Exchange, fallback_record
from metrion_addon.recording import Recorder
from metrion_addon.redact import redact_query
from metrion_addon.responses import answer_with_error
from metrion_addon.routes import is_metrion_path, route_metrion_path, route_provider_host
from metrion_addon.timeouts import Timeouts

_REQUEST_HOOKS = ("request", "http_connect")  # a failure here must answer the request: it is not forwarded yet
_FINAL_HOOKS = ("response", "error")  # a failure here must still leave the row


class Failures:
    def __init__(self, recorder: Recorder, forward_proxy: ForwardProxy, timeouts: Timeouts) -> None:
        self.runtime = recorder.runtime
        self.recorder = recorder
        self.forward_proxy = forward_proxy
        self.timeouts = timeouts

    def contain(self, hook: str, arg: object, description: str) -> None:
        """An unexpected exception in `hook`: never forward the request, always leave its row."""
        if hook == "_abandon" and isinstance(arg, str):
            self.recorder.put(arg, fallback_record(self.recorder.exchanges[arg], None, description))
        if not isinstance(arg, http.HTTPFlow):
            return  # lifecycle and connection hooks: the guard logged it; no request is waiting on them
        flow = arg
        if hook in _REQUEST_HOOKS:
            self._refuse(flow, description)
        elif hook in _FINAL_HOOKS:
            self.timeouts.stop(flow.id)
            redact_request(flow.request)
            if exchange := self.recorder.exchanges.get(flow.id):
                status = flow.response.status_code if flow.response else None
                self.recorder.put(flow.id, fallback_record(exchange, status, description))
        else:
            self.note(flow.id, description)

    def note(self, flow_id: str, description: str) -> None:
        """Metering failed mid-answer: the answer goes on, and the row will say why its usage may be missing."""
        if exchange := self.recorder.exchanges.get(flow_id):
            exchange.internal_error = description

    def _refuse(self, flow: http.HTTPFlow, description: str) -> None:
        self.timeouts.stop(flow.id)
        flow.metadata.pop("metrion", None)
        error = MetrionError(500, "metrion_internal_error",
                             f"Metrion failed while handling this request ({description}); it was not forwarded.")
        exchange = self.recorder.exchanges.get(flow.id) or self._exchange(flow)
        error_format = exchange.route.format if exchange else None
        if exchange is not None:
            exchange.failure = error
        answer_with_error(flow, error_format, error, exchange)
        drop_metrion_headers(flow.request.headers)
        redact(flow.request.headers)

    def _exchange(self, flow: http.HTTPFlow) -> Exchange | None:
        """The exchange of a request that failed before Metrion routed it; None if it is no provider route."""
        if self.runtime.config is None or flow.request.method == "CONNECT":
            return None
        path, _ = lift_query_key(flow.request.path)
        route = None
        if provider := self.forward_proxy.provider(flow):
            route = route_provider_host(provider, flow.request.host, path, self.runtime.urls)
        elif is_metrion_path(path):
            route = route_metrion_path(path, self.runtime.urls)
        if route is None:
            return None
        flow.request.path = path  # a ?key= never stays in the flow
        exchange = Exchange(route, redact_query(path), flow.request.method, started=self.runtime.clock(),
                            requester=requester({"x-metrion-user": flow.request.headers.get("x-metrion-user", "")}))
        self.recorder.exchanges[flow.id] = exchange
        return exchange
