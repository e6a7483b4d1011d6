"""Metrion's own answers without a proxy: refusals carry the limit headers, replays keep the stored bytes, provider
connections are one request each."""

from __future__ import annotations

import json

import pytest
from mitmproxy import connection
from mitmproxy.test import tflow

from metrion_addon import cache
from metrion_addon.display import REJECTED_MARK
from metrion_addon.errors import MetrionError
from metrion_addon.forward_proxy import one_request_per_connection
from metrion_addon.metering import Exchange
from metrion_addon.responses import answer_with_error, error_response, replayed
from metrion_addon.routes import route_metrion_path

URLS = {"openai": "http://127.0.0.1:9000/openai/v1", "anthropic": "http://127.0.0.1:9000/anthropic"}


def test_a_refusal_is_provider_shaped_and_keeps_the_exchange_limit_headers() -> None:
    route = route_metrion_path("/api/proxy/v1/messages", URLS)
    assert route is not None
    exchange = Exchange(route, "/api/proxy/v1/messages", "POST", started=0.0)
    exchange.limit_headers = {"x-ratelimit-remaining-requests": "0"}
    error = MetrionError(429, "rate_limited", "slow down", {"retry-after": "3"})
    response = error_response(route.format, error, exchange)
    assert response.status_code == 429
    assert response.headers["x-ratelimit-remaining-requests"] == "0" and response.headers["retry-after"] == "3"
    assert response.headers["x-metrion-error"] == "rate_limited"
    assert json.loads(response.content) == {"type": "error", "error": {"type": "rate_limit_error",
                                                                       "message": "slow down"}}


def test_answering_with_an_error_marks_the_flow_as_refused() -> None:
    flow = tflow.tflow()
    answer_with_error(flow, None, MetrionError(403, "host_blocked", "no"))
    assert flow.response is not None and flow.response.status_code == 403 and flow.marked == REJECTED_MARK


def test_a_replay_is_sent_with_the_stored_status_headers_and_body() -> None:
    response = replayed(cache.Replay(200, ((b"content-type", b"text/event-stream"), (b"age", b"4")), b"data: x\n\n"))
    assert (response.status_code, response.reason, response.raw_content) == (200, "OK", b"data: x\n\n")
    assert response.headers.fields == ((b"content-type", b"text/event-stream"), (b"age", b"4"))


@pytest.mark.parametrize(("host", "offers", "expected"), [
    ("127.0.0.1", (), (b"http/1.1",)),  # a provider: HTTP/1.1, one request per connection
    ("example.com", (), ()),  # another host: untouched
    ("127.0.0.1", (b"h2",), (b"h2",)),  # the client chose already
])
def test_provider_connections_speak_http_1_1_unless_chosen(host: str, offers: tuple[bytes, ...],
                                                           expected: tuple[bytes, ...]) -> None:
    server = connection.Server(address=(host, 443), alpn_offers=offers)
    one_request_per_connection(server, {"127.0.0.1"})
    assert server.alpn_offers == expected
