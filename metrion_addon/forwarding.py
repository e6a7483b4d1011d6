"""An admitted request, sent on: its limit state queued for the writer, its budget reservation tracked, its
headers and credentials set for the provider, its target pointed at the provider and its idle timer started."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http.url import hostport

from metrion_addon.auth import Upstream
from metrion_addon.budgets import Hold
from metrion_addon.headers import rewrite
from metrion_addon.limits import Admission
from metrion_addon.metering import Exchange
from metrion_addon.request_body import needs_stream_usage, with_stream_usage
from metrion_addon.routes import upstream_target
from metrion_addon.runtime import Runtime
from metrion_addon.timeouts import Timeouts


class Forwarding:
    def __init__(self, runtime: Runtime, timeouts: Timeouts) -> None:
        self.runtime = runtime
        self.timeouts = timeouts

    def let_through(self, flow: http.HTTPFlow, exchange: Exchange, admission: Admission, hold: Hold | None,
                    headers: dict[str, str], credentials: Upstream | None) -> None:
        """Send `flow` on to its provider: it was admitted (`admission`, and `hold` for a budgeted token)."""
        assert self.runtime.writer is not None
        exchange.limit_headers = {**admission.headers, **hold.headers} if hold else admission.headers
        for state in (*admission.saved, hold.saved) if hold and hold.saved else admission.saved:
            self.runtime.writer.put(state)
        if hold:
            self.runtime.budgets.track(flow.id, hold)
        drop, replace = upstream_header_changes(headers, credentials)
        if credentials is not None and credentials.set_headers:
            exchange.secret_sources += ((credentials.set_headers, ""),)
        rewrite(flow.request.headers, drop, replace)
        self._point_upstream(flow, exchange)

    def _point_upstream(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        config = self.runtime.config
        assert config is not None
        request, route = flow.request, exchange.route
        asks = config.providers[route.provider].include_usage
        if exchange.request and exchange.request.parsed is not None and needs_stream_usage(
            route, exchange.request, asks
        ):
            request.content = with_stream_usage(request.raw_content or b"", exchange.request.parsed)
            exchange.hide_usage_chunk = True
        point_at(request, route.upstream_url)
        exchange.forwarded = True
        self.timeouts.start(flow, config.timeout)
        token = exchange.identity.token_name if exchange.identity else None
        flow.metadata["metrion"] = {"provider": route.provider, "token": token}


def upstream_header_changes(headers: dict[str, str], credentials: Upstream | None) -> tuple[set[str], dict[str, str]]:
    """The request headers to drop and to set before a request goes to its provider (`headers` lower-cased)."""
    drop = {name for name in headers if name.startswith("x-metrion-")}
    drop.add("proxy-authorization")  # sent by forward-proxy clients, for Metrion only
    replace = {"accept-encoding": "identity"}  # the meter must read plain text
    if credentials is not None:
        drop.update(credentials.drop_headers)
        replace.update(credentials.set_headers or {})
    return drop, replace


def point_at(request: http.Request, url: str) -> None:
    """Send `request` to `url`: what setting mitmproxy's scheme, host, port and path does (the first Host header
    and an HTTP/2 authority follow), with the Host header rewritten once instead of after each field's setter
    (those setters were a third of the request hook's time)."""
    scheme, host, port, path = upstream_target(url)
    data = request.data
    data.scheme, data.host, data.port = scheme.encode(), host, port
    data.path = path.encode("utf-8", "surrogateescape")
    authority = hostport(scheme, host, port)
    fields, seen = [], False
    for name, value in data.headers.fields:
        if name.lower() == b"host":
            if seen:
                continue  # mitmproxy's setter keeps one Host header too
            value, seen = authority.encode("utf-8", "surrogateescape"), True
        fields.append((name, value))
    data.headers.fields = tuple(fields)
    if data.authority:
        request.authority = authority
