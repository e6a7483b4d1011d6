"""Header edits over raw fields: the snapshot, one-pass rewrite, x-metrion-* removal and credential redaction."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from metrion_addon.headers import drop_metrion_headers, lowercase, redact, redact_request, rewrite
from metrion_addon.routes import upstream_target


def headers(*fields: tuple[str, str]) -> http.Headers:
    return http.Headers([(name.encode(), value.encode()) for name, value in fields])


def test_snapshot_lower_cases_names_and_keeps_undecodable_bytes() -> None:
    snapshot = lowercase(http.Headers([(b"X-Metrion-User", b"web"), (b"Odd", b"\xff")]))
    assert snapshot == {"x-metrion-user": "web", "odd": "\udcff"}


def test_rewrite_drops_and_replaces_case_insensitively_and_keeps_the_rest_in_order() -> None:
    h = headers(("Host", "a"), ("Authorization", "Bearer sk"), ("Accept-Encoding", "gzip"), ("X-Keep", "1"))
    rewrite(h, {"authorization"}, {"accept-encoding": "identity", "x-api-key": "k"})
    assert h.fields == ((b"Host", b"a"), (b"X-Keep", b"1"), (b"accept-encoding", b"identity"), (b"x-api-key", b"k"))


def test_every_x_metrion_header_is_dropped() -> None:
    h = headers(("X-Metrion-Token", "t"), ("x-metrion-user", "u"), ("X-Metrion-Cache", "no-store"), ("x-other", "o"))
    drop_metrion_headers(h)
    assert h.fields == ((b"x-other", b"o"),)


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("Authorization", "Bearer sk-live-123456", b"Bearer [redacted]"),
    ("Proxy-Authorization", "Basic dXNlcjpwYXNz", b"Basic [redacted]"),
    ("x-api-key", "sk-ant-123456", b"[redacted]"),
    ("x-goog-api-key", "AIza123456", b"[redacted]"),
    ("X-Metrion-Token", "sk-metrion-" + "c" * 32, b"[redacted]"),
    ("Authorization", "Token abc def", b"[redacted]"),
    ("Authorization", "Bearer [redacted]", b"Bearer [redacted]"),
    ("content-type", "application/json", b"application/json"),
])
def test_credentials_are_redacted_keeping_only_a_bearer_or_basic_scheme(name: str, value: str, expected: bytes) -> None:
    h = headers((name, value), ("host", "h"))
    redact(h)
    redact(h)  # idempotent
    assert h.fields == ((name.encode(), expected), (b"host", b"h"))


def test_a_sent_request_keeps_no_credential_header_or_query_key() -> None:
    request = tutils.treq(path=b"/v1beta/models/g:generateContent?key=AIza-secret-1234&alt=sse",
                          headers=http.Headers(x_goog_api_key="AIza-secret-1234"))
    redact_request(request)
    assert request.path == "/v1beta/models/g:generateContent?key=[redacted]&alt=sse"
    assert request.headers["x-goog-api-key"] == "[redacted]"


@pytest.mark.parametrize(("url", "expected"), [
    ("https://api.openai.com/v1/chat/completions", ("https", "api.openai.com", 443, "/v1/chat/completions")),
    ("http://127.0.0.1:9000/v1/messages?beta=true", ("http", "127.0.0.1", 9000, "/v1/messages?beta=true")),
    ("http://mock/v1", ("http", "mock", 80, "/v1")),
])
def test_upstream_target_splits_the_url_into_the_fields_a_forwarded_request_sets(
        url: str, expected: tuple[str, str, int, str]) -> None:
    assert upstream_target(url) == expected
