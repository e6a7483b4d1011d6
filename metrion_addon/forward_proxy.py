"""Clients that use Metrion as their HTTP(S) proxy: who opened each tunnel, and what happens to traffic for a
host that is no provider's (blocked, or passed on untouched for a token holder, or for anyone if configured)."""

from __future__ import annotations

import weakref

from mitmproxy import connection, http

from metrion_addon.auth import Identity, identify_forward, other_host_identity
from metrion_addon.errors import MetrionError
from metrion_addon.headers import redact, rewrite
from metrion_addon.responses import answer_with_error
from metrion_addon.routes import host_provider
from metrion_addon.runtime import Runtime


class ForwardProxy:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._tunnels: weakref.WeakKeyDictionary[connection.Client, Identity] = weakref.WeakKeyDictionary()

    def provider(self, flow: http.HTTPFlow) -> str | None:
        """The provider whose host `flow` is addressed to (forward-proxy use), or None."""
        return host_provider(flow.request.host, flow.request.port, self.runtime.hosts)

    def connect(self, flow: http.HTTPFlow) -> None:
        """A CONNECT: remember who opened the tunnel, or refuse it (407 without a token, 403 for a blocked host)."""
        config = self.runtime.config
        assert config is not None
        credentials = flow.request.headers.get("proxy-authorization")
        try:
            if self.provider(flow):
                self._tunnels[flow.client_conn] = identify_forward(credentials, self.runtime.tokens)
            elif config.block_other_hosts:
                raise MetrionError(403, "host_blocked", _blocked(flow.request.host))
            elif identity := other_host_identity(credentials, self.runtime.tokens, tunnel=None,
                                                 open_to_all=config.allow_other_hosts_without_token):
                self._tunnels[flow.client_conn] = identity
        except MetrionError as e:
            answer_with_error(flow, None, e)
        redact(flow.request.headers)  # CONNECT flows are kept and saved like any other

    def identity(self, flow: http.HTTPFlow, proxy_authorization: str | None) -> Identity:
        """Who sends a request to a provider host: the tunnel's owner, else its own Proxy-Authorization (or 407)."""
        return self._tunnels.get(flow.client_conn) or identify_forward(proxy_authorization, self.runtime.tokens)

    def pass_other_host(self, flow: http.HTTPFlow) -> None:
        """Traffic that is not Metrion's: blocked, or passed on for a token holder (or anyone, if configured)."""
        config = self.runtime.config
        assert config is not None
        headers = flow.request.headers
        try:
            if config.block_other_hosts:
                raise MetrionError(403, "host_blocked", _blocked(flow.request.host))
            other_host_identity(headers.get("proxy-authorization"), self.runtime.tokens,
                                tunnel=self._tunnels.get(flow.client_conn),
                                open_to_all=config.allow_other_hosts_without_token)
        except MetrionError as e:
            answer_with_error(flow, None, e)
            redact(headers)
            return
        rewrite(headers, {"proxy-authorization"}, {})  # the proxy's credential is for Metrion, never the host


def one_request_per_connection(server: connection.Server, upstream_hosts: set[str | None]) -> None:
    """One upstream connection per flow (HTTP/1.1) to a provider lets a timeout close exactly one request."""
    if server.address and server.address[0] in upstream_hosts and not server.alpn_offers:
        server.alpn_offers = (b"http/1.1",)


def _blocked(host: str) -> str:
    return f"Metrion: {host} is not an AI provider host, and this proxy blocks other hosts."
