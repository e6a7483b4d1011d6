"""What a forwarded request carries to its provider: Metrion's own headers gone, the stored key set, plain text,
and its target set as mitmproxy's setters would."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from metrion_addon.auth import Upstream
from metrion_addon.forwarding import point_at, upstream_header_changes
from metrion_addon.routes import upstream_target

SNAPSHOT = {"host": "h", "x-metrion-token": "t", "x-metrion-user": "u", "authorization": "Bearer sk-metrion-x",
            "content-type": "application/json"}


@pytest.mark.parametrize(("credentials", "drop", "replace"), [
    (None, {"x-metrion-token", "x-metrion-user", "proxy-authorization"}, {"accept-encoding": "identity"}),
    (Upstream({"authorization": "Bearer sk-stored"}, ("x-api-key",)),
     {"x-metrion-token", "x-metrion-user", "proxy-authorization", "x-api-key"},
     {"accept-encoding": "identity", "authorization": "Bearer sk-stored"}),
    (Upstream(None, ("authorization",)),
     {"x-metrion-token", "x-metrion-user", "proxy-authorization", "authorization"}, {"accept-encoding": "identity"}),
])
def test_metrion_headers_and_proxy_credentials_never_reach_the_provider(
        credentials: Upstream | None, drop: set[str], replace: dict[str, str]) -> None:
    assert upstream_header_changes(SNAPSHOT, credentials) == (drop, replace)


@pytest.mark.parametrize("http_version", ["HTTP/1.1", "HTTP/2.0"])
@pytest.mark.parametrize("host_headers", [(), (b"127.0.0.1:8080",), (b"a", b"b")])
@pytest.mark.parametrize("url", ["https://api.openai.com/v1/chat/completions", "http://127.0.0.1:9000/v1/m?beta=true",
                                 "https://[::1]:8443/v1"])
def test_point_at_sets_what_mitmproxys_setters_set(http_version: str, host_headers: tuple[bytes, ...],
                                                  url: str) -> None:
    def request() -> http.Request:
        fields = ((b"accept", b"*/*"), *((b"Host", h) for h in host_headers), (b"content-type", b"application/json"))
        req = tutils.treq(path=b"/api/proxy/openai/v1/chat/completions", http_version=http_version.encode(),
                          headers=http.Headers(fields), host="127.0.0.1", port=8080)
        req.authority = "127.0.0.1:8080" if http_version == "HTTP/2.0" else ""
        return req

    by_setters, by_point_at = request(), request()
    by_setters.scheme, by_setters.host, by_setters.port, by_setters.path = upstream_target(url)
    point_at(by_point_at, url)
    assert by_point_at.data == by_setters.data  # url, headers (in order), authority: every field
