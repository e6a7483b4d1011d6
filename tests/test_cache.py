"""The response cache's pure parts: header parsing, the key, what may be stored, the replay and the hit row."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metrion_addon import cache
from metrion_addon.cache import CacheEntry, CachePlan, Mode, StreamRecorder
from metrion_addon.errors import MetrionError
from metrion_addon.request_body import RequestBody
from metrion_addon.routes import Route
from metrion_addon.store import RequestRecord

CHAT = Route("openai", "chat/completions", "https://api.openai.com/v1/chat/completions")
MESSAGES = Route("anthropic", "messages", "https://api.anthropic.com/v1/messages")
DAY = 86_400


@pytest.mark.parametrize("value,mode", [
    (None, None), ("false", None), ("FALSE ", None), ("true", Mode.LOOKUP), (" True", Mode.LOOKUP),
    ("refresh", Mode.REFRESH), ("REFRESH", Mode.REFRESH),
])
def test_cache_header_values(value, mode) -> None:
    assert cache.parse_mode(value) is mode


@pytest.mark.parametrize("value", ["", "yes", "1", "on", "true, refresh", "hit"])
def test_any_other_cache_header_value_is_a_400(value: str) -> None:
    with pytest.raises(MetrionError, match="not a cache directive") as raised:
        cache.parse_mode(value)
    assert (raised.value.status, raised.value.code) == (400, "invalid_cache_header")


@pytest.mark.parametrize("header,seconds", [
    (None, 7 * DAY),
    ("no-cache", 7 * DAY),
    ("max-age=60", 60),
    ("MAX-AGE = 60", 60),
    ('max-age="3600"', 3600),
    ("no-store, max-age=0", 0),
    (f"max-age={365 * DAY}", 365 * DAY),
    (f"max-age={365 * DAY + 1}", 365 * DAY),
    ("max-age=" + "9" * 40, 365 * DAY),
    ("s-maxage=5, x-max-age=7", 7 * DAY),
])
def test_max_age_sets_the_lifetime_default_a_week_clamped_to_a_year(header, seconds) -> None:
    assert cache.parse_max_age(header) == seconds


@pytest.mark.parametrize("header", ["max-age", "max-age=", "max-age=1.5", "max-age=-1", "max-age=1e3",
                                    "max-age=60, max-age=60", "max-age=soon", 'max-age="6 0"'])
def test_malformed_max_age_is_a_400(header: str) -> None:
    with pytest.raises(MetrionError, match="max-age must be one whole number") as raised:
        cache.parse_max_age(header)
    assert (raised.value.status, raised.value.code) == (400, "invalid_cache_control")


@given(st.integers(min_value=0, max_value=10**30), st.sampled_from(["", "no-cache, ", "private,"]),
       st.sampled_from(["", " ", ", public"]), st.booleans())
def test_any_whole_number_of_seconds_is_accepted_and_clamped(seconds, before, after, quoted) -> None:
    value = f'"{seconds}"' if quoted else str(seconds)
    assert cache.parse_max_age(f"{before}max-age={value}{after}") == min(seconds, cache.LONGEST_MAX_AGE)


def key(body: dict, scope: str = "app", route: Route = CHAT, method: str = "POST") -> str:
    raw = json.dumps(body).encode()
    request = RequestBody(body.get("model"), body.get("stream") is True, body)
    return cache.cache_key(scope, route, method, request, raw, include_usage=route.provider == "openai")


BASE = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), st.randoms(use_true_random=False),
       st.sampled_from([None, 1, 2]))
def test_key_ignores_key_order_and_whitespace(body: dict, random, indent) -> None:
    items = list(body.items())
    random.shuffle(items)
    shuffled = dict(items)
    raw = json.dumps(shuffled, indent=indent).encode()
    request = RequestBody(None, False, shuffled)
    assert cache.cache_key("app", CHAT, "POST", request, raw, True) == key(body)


@pytest.mark.parametrize("field,value", [("user", "alice"), ("metadata", {"run": 1}),
                                         ("stream_options", {"include_usage": True})])
def test_fields_that_cannot_change_the_answer_are_left_out_of_the_key(field: str, value: object) -> None:
    assert key({**BASE, field: value}) == key(BASE)


@pytest.mark.parametrize("change", [
    {"temperature": 0.7}, {"max_tokens": 5}, {"system": "be terse"}, {"tools": [{"type": "function"}]},
    {"model": "gpt-4o-mini"}, {"messages": [{"role": "user", "content": "hi!"}]}, {"stream": True},
    {"temperature": None}, {"n": 2},
])
def test_any_other_field_changes_the_key(change: dict) -> None:
    assert key({**BASE, **change}) != key(BASE)


def test_token_provider_path_and_method_change_the_key() -> None:
    other_path = Route("openai", "responses", "https://api.openai.com/v1/responses")
    other_provider = Route("grok", "chat/completions", "https://api.x.ai/v1/chat/completions")
    keys = {key(BASE), key(BASE, scope="other"), key(BASE, route=other_path), key(BASE, route=other_provider),
            key(BASE, method="PUT")}
    assert len(keys) == 5


def test_a_hidden_usage_chunk_is_part_of_the_key_because_the_client_sees_different_bytes() -> None:
    streamed = {**BASE, "stream": True}
    assert key({**streamed, "stream_options": {"include_usage": True}}) != key(streamed)
    assert key({**streamed, "stream_options": {"include_usage": False}}) == key(streamed)


def test_credentials_in_the_query_are_not_part_of_the_key() -> None:
    with_key = Route("gemini", "models/x:generateContent", "https://g/models/x:generateContent?key=SECRET&alt=sse")
    other_key = Route("gemini", "models/x:generateContent", "https://g/models/x:generateContent?alt=sse&key=OTHER")
    no_alt = Route("gemini", "models/x:generateContent", "https://g/models/x:generateContent?key=SECRET")
    assert key(BASE, route=with_key) == key(BASE, route=other_key) != key(BASE, route=no_alt)


def test_bodies_that_are_not_json_objects_are_keyed_on_their_bytes() -> None:
    one = cache.cache_key("app", CHAT, "GET", None, b"", True)
    assert one == cache.cache_key("app", CHAT, "GET", None, b"", True) != cache.cache_key("app", CHAT, "GET", None,
                                                                                          b"x", True)


def test_a_body_nested_too_deep_to_re_encode_is_keyed_on_its_bytes() -> None:
    deep: object = []
    for _ in range(100_000):
        deep = [deep]
    assert cache.canonical_body({"messages": deep}, b"raw bytes") == b"raw:raw bytes"


def test_stored_mode_entries_belong_to_the_token_and_own_key_entries_to_the_token_and_that_key() -> None:
    one, other = {"authorization": "Bearer sk-one"}, {"authorization": "Bearer sk-other"}
    assert cache.scope("app", "stored", one, False) == cache.scope("app", "stored", other, False) == "token:app"
    assert cache.scope("app", "pass-through", one, False) != cache.scope("app", "pass-through", other, False)
    assert cache.scope("app", "forward", one, False) == cache.scope("app", "pass-through", one, False)
    assert cache.scope("app", "pass-through", one, True) == cache.scope("ci", "pass-through", one, True)
    assert cache.scope("app", "stored", one, True) == cache.scope("ci", "stored", other, True) == "*"
    assert "sk-one" not in cache.scope("app", "pass-through", one, False)


def test_no_plan_without_the_header() -> None:
    assert cache.plan({}, "app", CHAT, "POST", None, b"", True) is None
    assert cache.plan({"x-metrion-cache": "false"}, "app", CHAT, "POST", None, b"", True) is None
    headers = {"x-metrion-cache": "refresh", "cache-control": "max-age=5"}
    planned = cache.plan(headers, "app", CHAT, "POST", None, b"", True)
    assert planned is not None and (planned.mode, planned.max_age) == (Mode.REFRESH, 5)


ANTHROPIC_STREAM = (b'event: message_start\ndata: {"type":"message_start"}\n\n'
                    b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def record(**fields: object) -> RequestRecord:
    values: dict = dict(ts="2026-11-24T10:00:00.000Z", token_name="app", requester=None, provider="openai",
                        model="gpt-4o-2024-08-06", path="/api/proxy/openai/v1/chat/completions", method="POST",
                        stream=False, status=200, input_tokens=10, output_tokens=5, total_tokens=15,
                        usage_source="provider", cost_usd=0.25, price_source="config")
    return RequestRecord(**{**values, **fields})


PLAN = CachePlan(Mode.LOOKUP, "k" * 64, 60)
HEADERS = {"content-type": "application/json", "x-request-id": "req_1", "set-cookie": "a=b", "server": "x"}


def test_a_complete_2xx_reply_is_stored_with_the_headers_that_matter() -> None:
    entry = cache.entry_for(PLAN, record(), HEADERS, b'{"ok":1}', stream=False, complete=True, now=1000.0,
                            max_bytes=1 << 20)
    assert entry == CacheEntry("k" * 64, "app", "openai", "gpt-4o-2024-08-06", 200,
                               (("content-type", "application/json"), ("x-request-id", "req_1")), b'{"ok":1}',
                               False, 1000.0, 1060.0)


@pytest.mark.parametrize("fields,body,complete,max_age,limit", [
    ({"status": 500, "error": "provider: boom"}, b"{}", True, 60, 1 << 20),
    ({"status": 429}, b"{}", True, 60, 1 << 20),
    ({"error": "provider error in stream: Overloaded"}, ANTHROPIC_STREAM, True, 60, 1 << 20),
    ({}, ANTHROPIC_STREAM[:60], False, 60, 1 << 20),
    ({}, None, True, 60, 1 << 20),
    ({}, b"{}", True, 0, 1 << 20),
    ({}, b"x" * 100, True, 60, 99),
    ({"token_name": None}, b"{}", True, 60, 1 << 20),
], ids=["provider error", "429", "stream error", "no terminal event", "overflowed", "max-age 0", "too large",
        "no token"])
def test_what_is_never_stored(fields: dict, body, complete: bool, max_age: int, limit: int) -> None:
    plan = CachePlan(Mode.LOOKUP, "k", max_age)
    stored = cache.entry_for(plan, record(**fields), HEADERS, body, stream=True, complete=complete, now=0.0,
                             max_bytes=limit)
    assert stored is None


def test_a_hit_replays_status_headers_and_body_and_says_how_old_it_is() -> None:
    headers = (("content-type", "text/event-stream"), ("request-id", "req_9"))
    entry = CacheEntry("k", "app", "anthropic", "m", 200, headers, ANTHROPIC_STREAM, True, 100.0, 200.0)
    replayed = cache.replay(entry, 142.7)
    assert replayed.status == 200 and replayed.body == ANTHROPIC_STREAM
    assert replayed.headers == ((b"content-type", b"text/event-stream"), (b"request-id", b"req_9"),
                                (b"transfer-encoding", b"chunked"), (b"x-metrion-cache", b"HIT"), (b"age", b"42"))
    json_entry = CacheEntry("k", "app", "openai", "m", 201, (), b"{}", False, 100.0, 200.0)
    assert (b"content-length", b"2") in cache.replay(json_entry, 100.0).headers


def test_the_hit_row_has_no_tokens_no_cost_and_what_the_original_cost() -> None:
    hit = CacheEntry("k", "app", "openai", "gpt-4o-2024-08-06", 200, (), b"{}", False, 0.0, 1.0, cost_usd=0.125)
    row = cache.account(record(model="gpt-4o"), cache.Outcome.HIT, hit)
    assert (row.cached, row.cache_status, row.saved_usd, row.cost_usd, row.price_source) == (
        True, "HIT", 0.125, 0.0, "cache")
    assert (row.input_tokens, row.output_tokens, row.total_tokens, row.usage_source, row.model) == (
        0, 0, 0, "none", "gpt-4o-2024-08-06")
    # a Gemini native stream says so in its path, not its body: the row takes it from the replayed entry
    streamed = dataclasses.replace(hit, stream=True)
    assert cache.account(record(stream=False), cache.Outcome.HIT, streamed).stream is True
    miss = cache.account(record(), cache.outcome(PLAN), None)
    assert (miss.cached, miss.cache_status, miss.input_tokens, miss.cost_usd) == (False, "MISS", 10, 0.25)
    refresh = cache.account(record(), cache.outcome(CachePlan(Mode.REFRESH, "k", 60)), None)
    assert refresh.cache_status == "REFRESH"
    refused = cache.account(record(status=429), None, None)  # refused before it was looked up or forwarded
    assert refused.cache_status is None


@given(st.lists(st.binary(max_size=20), max_size=10))
def test_the_recorder_keeps_exactly_what_the_client_received(chunks: list[bytes]) -> None:
    recorder = StreamRecorder(lambda data: [data[1:]] if data else [], 1 << 20)
    for chunk in chunks:
        recorder(chunk)
    assert recorder.body == b"".join(chunk[1:] for chunk in chunks)


def test_the_recorder_gives_up_past_its_limit_but_forwards_everything() -> None:
    recorder = StreamRecorder(lambda data: data, 10)
    assert [recorder(b"123456"), recorder(b"789012"), recorder(b"3")] == [b"123456", b"789012", b"3"]
    assert recorder.body is None and recorder.overflowed
