"""The response cache through a real mitmdump, driven by the official SDKs and raw HTTP against the mock.

A repeated request is answered by Metrion byte for byte (streams event for event) and never reaches the mock.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import types as genai_types
from harness import APP_TOKEN, PASS_TOKEN, Proxy, token
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_metering import MODELS, PROVIDERS, label, received_for, request_for

from metrion_addon.mock_provider import MockProvider
from metrion_addon.sse import SSEDecoder

CACHE = {"x-metrion-cache": "true"}


def entry_keys(proxy: Proxy) -> set[str]:
    with sqlite3.connect(proxy.db_path) as conn:
        return {key for (key,) in conn.execute("SELECT key FROM cache_entries")}


def wait_for_entry(proxy: Proxy, mock: MockProvider, answer: Mapping[str, str], timeout: float = 5.0) -> str:
    """The key of the entry stored for `answer` (a MISS's response headers): the one holding the first event the
    mock sent for it that is not a comment (or its whole body), which carries the reply's random id. The writer
    stores entries within a batch, so an earlier test's entry may land after this one began: a new key alone does
    not say whose it is. (Not the whole stream: a usage chunk Metrion hid from the client is not stored.)"""
    events = re.split(rb"\r?\n\r?\n", mock.sent[answer["x-mock-id"]])
    first_event = next(event for event in events if not event.startswith(b":"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(proxy.db_path) as conn:
            if row := conn.execute("SELECT key FROM cache_entries WHERE instr(body, ?)", (first_event,)).fetchone():
                return row[0]
        time.sleep(0.02)
    raise AssertionError("no cache entry was stored")


def client_for(proxy: Proxy, provider: str, who: str, key: str = APP_TOKEN):
    headers = {"x-metrion-user": who}
    if provider == "anthropic":
        return anthropic.Anthropic(base_url=f"{proxy.url}/api/proxy", api_key=key, default_headers=headers,
                                   max_retries=0)
    return openai.OpenAI(base_url=f"{proxy.url}/api/proxy/{provider}/v1", api_key=key, default_headers=headers,
                         max_retries=0)


def sdk_call(client, provider: str, text: str, stream: bool, headers: dict[str, str] | None = None,
             **extra: object) -> tuple[dict[str, str], list | bytes]:
    """One chat request through the SDK: (response headers, raw body) or, streamed, (headers, parsed events)."""
    messages = [{"role": "user", "content": text}]
    headers = {**CACHE, **(headers or {})}
    if provider == "anthropic":
        api, args = client.messages, {"max_tokens": 64, **extra}
    else:
        api, args = client.chat.completions, extra
    if not stream:
        raw = api.with_raw_response.create(model=MODELS[provider], messages=messages, extra_headers=headers, **args)
        raw.parse()  # the SDK accepts the answer
        return dict(raw.headers), raw.http_response.content
    with api.with_streaming_response.create(model=MODELS[provider], messages=messages, stream=True,
                                            extra_headers=headers, **args) as response:
        return dict(response.headers), [event.model_dump() for event in response.parse()]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_repeated_sdk_request_is_a_hit_that_never_reaches_the_provider(
    proxy: Proxy, mock: MockProvider, provider: str, stream: bool
) -> None:
    who = label()
    client = client_for(proxy, provider, who)
    first_headers, first = sdk_call(client, provider, f"cache me {who}", stream)
    wait_for_entry(proxy, mock, first_headers)
    second_headers, second = sdk_call(client, provider, f"cache me {who}", stream)

    assert (first_headers["x-metrion-cache"], second_headers["x-metrion-cache"]) == ("MISS", "HIT")
    assert second == first and len(first) > 0  # the same bytes, or the same events in the same order
    assert second_headers["content-type"] == first_headers["content-type"]
    for request_id in ("request-id", "x-request-id"):
        assert second_headers.get(request_id) == first_headers.get(request_id)
    (sent,) = received_for(mock, who)
    assert not [name for name in sent.headers if name.lower().startswith("x-metrion-")]  # the header stays here
    miss, hit = proxy.rows("requester = ?", (who,), n=2)
    assert (miss["cached"], miss["cache_status"], hit["cached"], hit["cache_status"]) == (0, "MISS", 1, "HIT")
    assert miss["input_tokens"] > 0 and miss["cost_usd"] is not None and miss["cost_usd"] > 0
    assert (hit["input_tokens"], hit["output_tokens"], hit["total_tokens"], hit["cost_usd"]) == (0, 0, 0, 0)
    assert hit["saved_usd"] == miss["cost_usd"]
    assert (hit["status"], hit["model"], hit["stream"], hit["error"]) == (200, miss["model"], stream, None)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_stream_hit_is_a_real_event_stream_with_the_same_bytes(proxy: Proxy, mock: MockProvider, provider: str) -> None:
    path, body, headers = request_for(provider, stream=True)
    headers = {**headers, **CACHE}
    with httpx.stream("POST", f"{proxy.url}{path}", json=body, headers=headers) as response:
        first = response.read()
    wait_for_entry(proxy, mock, response.headers)
    decoder, events = SSEDecoder(), []
    with httpx.stream("POST", f"{proxy.url}{path}", json=body, headers=headers) as response:
        assert response.headers["x-metrion-cache"] == "HIT"
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["transfer-encoding"] == "chunked" and "content-length" not in response.headers
        for chunk in response.iter_raw():
            events += decoder.feed(chunk)
    assert b"".join(event.raw for event in events) == first
    # What the client saw first is what is replayed: a usage chunk Metrion hid stays hidden.
    assert (b'"choices":[]' in first.replace(b" ", b"")) is False


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_geminis_own_sdk_on_the_native_api_gets_hits_too(proxy: Proxy, mock: MockProvider, stream: bool) -> None:
    who = label()
    gemini = genai.Client(api_key=APP_TOKEN, http_options=genai_types.HttpOptions(
        base_url=f"{proxy.url}/api/proxy/gemini", headers={"x-metrion-user": who, **CACHE}, timeout=10_000))

    def ask() -> tuple[dict[str, str], object]:
        if stream:
            chunks = list(gemini.models.generate_content_stream(model=MODELS["gemini"], contents=f"native {who}"))
            return dict(chunks[0].sdk_http_response.headers), [c.model_dump(exclude={"sdk_http_response"})
                                                               for c in chunks]
        reply = gemini.models.generate_content(model=MODELS["gemini"], contents=f"native {who}")
        return dict(reply.sdk_http_response.headers), reply.model_dump(exclude={"sdk_http_response"})

    first_headers, first = ask()
    wait_for_entry(proxy, mock, first_headers)
    second_headers, second = ask()
    assert (first_headers["x-metrion-cache"], second_headers["x-metrion-cache"]) == ("MISS", "HIT")
    assert second == first and first
    assert len(received_for(mock, who)) == 1
    miss, hit = proxy.rows("requester = ?", (who,), n=2)
    assert (hit["cached"], hit["cost_usd"], hit["input_tokens"], hit["stream"]) == (1, 0, 0, stream)
    assert miss["cost_usd"] > 0 and hit["saved_usd"] == miss["cost_usd"]


def test_geminis_streamed_json_array_is_replayed_as_sent(proxy: Proxy, mock: MockProvider) -> None:
    who = label()
    url = f"{proxy.url}/api/proxy/gemini/v1beta/models/{MODELS['gemini']}:streamGenerateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": f"array {who}"}]}]}
    headers = {"x-goog-api-key": APP_TOKEN, "x-metrion-user": who, **CACHE}
    first = httpx.post(url, json=body, headers=headers)
    wait_for_entry(proxy, mock, first.headers)
    second = httpx.post(url, json=body, headers=headers)
    assert second.headers["x-metrion-cache"] == "HIT" and second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"]
    assert len(received_for(mock, who)) == 1


def test_usage_chunk_the_client_asked_for_is_replayed_to_a_client_that_asks_for_it(proxy: Proxy,
                                                                                   mock: MockProvider) -> None:
    path, body, headers = request_for("openai", stream=True, stream_options={"include_usage": True})
    headers = {**headers, **CACHE}
    answer = httpx.post(f"{proxy.url}{path}", json=body, headers=headers)
    wait_for_entry(proxy, mock, answer.headers)
    first = answer.content
    hidden = httpx.post(f"{proxy.url}{path}", json={**body, "stream_options": {"include_usage": False}},
                        headers=headers)
    shown = httpx.post(f"{proxy.url}{path}", json=body, headers=headers)
    assert b'"choices":[]' in first
    assert hidden.headers["x-metrion-cache"] == "MISS" and b'"choices":[]' not in hidden.content
    assert shown.headers["x-metrion-cache"] == "HIT" and shown.content == first


def chat(proxy: Proxy, who: str, key: str = APP_TOKEN, headers: dict[str, str] | None = None,
         **body: object) -> httpx.Response:
    payload = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"key test {who}"}], **body}
    return httpx.post(f"{proxy.url}/api/proxy/openai/v1/chat/completions", json=payload, timeout=30,
                      headers={"authorization": f"Bearer {key}", "x-metrion-user": who, **CACHE, **(headers or {})})


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("change", [
    {"temperature": 0.2},
    {"max_tokens": 10},
    {"tools": TOOLS},
    {"system": "be terse"},
    {"stream": True},
], ids=["temperature", "max_tokens", "tools", "system", "stream"])
def test_a_change_that_matters_is_a_miss(proxy: Proxy, mock: MockProvider, change: dict) -> None:
    who = label()
    question = {"role": "user", "content": f"key test {who}"}
    if "system" in change:
        change = {"messages": [{"role": "system", "content": change["system"]}, question]}
    first = chat(proxy, who)
    assert first.headers["x-metrion-cache"] == "MISS"
    wait_for_entry(proxy, mock, first.headers)
    assert chat(proxy, who, **change).headers["x-metrion-cache"] == "MISS"
    assert len(received_for(mock, who)) == 2
    assert [row["cache_status"] for row in proxy.rows("requester = ?", (who,), n=2)] == ["MISS", "MISS"]


def test_fields_that_cannot_change_the_answer_and_key_order_still_hit(proxy: Proxy, mock: MockProvider) -> None:
    who = label()
    first = chat(proxy, who, temperature=0.5, user="alice")
    wait_for_entry(proxy, mock, first.headers)
    text = f'{{"temperature":0.5,   "messages":[{{"role":"user","content":"key test {who}"}}], "model":"gpt-4o",' \
           '"user":"bob","metadata":{"run":"2"}}'
    again = httpx.post(f"{proxy.url}/api/proxy/openai/v1/chat/completions", content=text.encode(),
                       headers={"authorization": f"Bearer {APP_TOKEN}", "content-type": "application/json", **CACHE})
    assert again.headers["x-metrion-cache"] == "HIT"
    assert len(received_for(mock, who)) == 1


def test_another_token_does_not_share_entries(proxy: Proxy, mock: MockProvider) -> None:
    who = label()
    first = chat(proxy, who)
    wait_for_entry(proxy, mock, first.headers)
    other = chat(proxy, who, key="sk-client-key", headers={"x-metrion-token": PASS_TOKEN})
    assert other.headers["x-metrion-cache"] == "MISS"
    assert chat(proxy, who).headers["x-metrion-cache"] == "HIT"
    assert len(received_for(mock, who)) == 2


def test_a_client_with_its_own_provider_key_only_reads_entries_made_with_that_key(proxy: Proxy,
                                                                                   mock: MockProvider) -> None:
    who = label()
    first = chat(proxy, who, key="sk-client-one", headers={"x-metrion-token": PASS_TOKEN})
    wait_for_entry(proxy, mock, first.headers)
    # the same Metrion token with another (say, wrong or revoked) provider key: the provider must see it
    other = chat(proxy, who, key="sk-client-two", headers={"x-metrion-token": PASS_TOKEN})
    same = chat(proxy, who, key="sk-client-one", headers={"x-metrion-token": PASS_TOKEN})
    assert (other.headers["x-metrion-cache"], same.headers["x-metrion-cache"]) == ("MISS", "HIT")
    assert [r.headers["authorization"] for r in received_for(mock, who)] == ["Bearer sk-client-one",
                                                                             "Bearer sk-client-two"]
    with sqlite3.connect(proxy.db_path) as conn:
        stored = conn.execute("SELECT key, token_name, headers, body FROM cache_entries").fetchall()
    assert stored and not any(b"sk-client" in str(field).encode() for row in stored for field in row)


def test_requests_without_the_header_are_neither_served_nor_stored(proxy: Proxy, mock: MockProvider) -> None:
    who = label()

    def stored() -> int:  # the mock echoes the prompt: an entry of a request of this test holds `who`
        with sqlite3.connect(proxy.db_path) as conn:
            query = "SELECT count(*) FROM cache_entries WHERE instr(body, ?)"
            return conn.execute(query, (who.encode(),)).fetchone()[0]

    for value in (None, "false"):
        response = chat(proxy, who, headers={"x-metrion-cache": value} if value else {"x-metrion-cache": "false"})
        assert "x-metrion-cache" not in response.headers
    time.sleep(0.3)  # two writer batches: nothing may have been stored
    assert stored() == 0
    assert len(received_for(mock, who)) == 2
    assert not any("x-metrion-cache" in r.headers for r in received_for(mock, who))
    assert [row["cache_status"] for row in proxy.rows("requester = ?", (who,), n=2)] == [None, None]
    chat(proxy, who)  # with the header, the same question is stored: the query above would have seen it
    deadline = time.monotonic() + 5
    while stored() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stored() == 1


def test_refresh_forwards_and_overwrites_the_entry(proxy: Proxy, mock: MockProvider) -> None:
    who = label()
    first = chat(proxy, who)
    key = wait_for_entry(proxy, mock, first.headers)
    refreshed = chat(proxy, who, headers={"x-metrion-cache": "refresh"})
    assert refreshed.headers["x-metrion-cache"] == "REFRESH" and refreshed.content != first.content
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        hit = chat(proxy, who)
        if hit.content == refreshed.content:
            break
        time.sleep(0.05)
    assert hit.headers["x-metrion-cache"] == "HIT" and hit.content == refreshed.content
    assert key in entry_keys(proxy)
    assert len(received_for(mock, who)) == 2
    refresh = proxy.rows("requester = ? AND cache_status = 'REFRESH'", (who,))[0]
    assert refresh["cached"] == 0 and refresh["cost_usd"] > 0 and refresh["saved_usd"] is None  # an ordinary row


@pytest.mark.parametrize("header,value", [
    ("x-metrion-cache", "yes"),
    ("x-metrion-cache", "TRUE!"),
    ("cache-control", "max-age=soon"),
    ("cache-control", "max-age=-5"),
    ("cache-control", "max-age=60, max-age=120"),
    ("cache-control", "no-store, max-age"),
])
def test_malformed_cache_headers_are_a_400_in_the_providers_shape(proxy: Proxy, mock: MockProvider, header: str,
                                                                   value: str) -> None:
    who = label()
    openai_client = client_for(proxy, "openai", who)
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": who}],
                                              extra_headers={**CACHE, header: value})
    assert raised.value.body["code"] in ("invalid_cache_header", "invalid_cache_control")
    claude = client_for(proxy, "anthropic", who)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODELS["anthropic"], max_tokens=8, messages=[{"role": "user", "content": who}],
                               extra_headers={**CACHE, header: value})
    assert received_for(mock, who) == []
    assert [row["status"] for row in proxy.rows("requester = ?", (who,), n=2)] == [400, 400]


def test_errors_are_not_cached(proxy: Proxy, mock: MockProvider) -> None:
    who = label()
    for _ in range(2):
        response = chat(proxy, who, headers={"x-mock-scenario": "error-500"})
        assert response.status_code == 500 and response.headers["x-metrion-cache"] == "MISS"
    assert len(received_for(mock, who)) == 2


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_cut_streams_are_not_cached(proxy: Proxy, mock: MockProvider, provider: str) -> None:
    path, body, headers = request_for(provider, stream=True)
    headers = {**headers, **CACHE, "x-mock-scenario": "cut-after:3"}
    for _ in range(2):
        with pytest.raises(httpx.HTTPError), httpx.stream("POST", f"{proxy.url}{path}", json=body,
                                                           headers=headers) as response:
            response.read()
    assert len(received_for(mock, body["messages"][0]["content"])) == 2


def test_streams_with_an_error_event_are_not_cached(proxy: Proxy, mock: MockProvider) -> None:
    path, body, headers = request_for("anthropic", stream=True)
    headers = {**headers, **CACHE, "x-mock-scenario": "in-stream-error"}
    for _ in range(2):
        assert b"overloaded_error" in httpx.post(f"{proxy.url}{path}", json=body, headers=headers).content
    assert len(received_for(mock, body["messages"][0]["content"])) == 2


def test_timeouts_are_not_cached(start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy(timeout=1)
    path, body, headers = request_for("openai", stream=True)
    headers = {**headers, **CACHE, "x-mock-scenario": "stall-after:2"}
    for _ in range(2):
        with pytest.raises(httpx.HTTPError), httpx.stream("POST", f"{proxy.url}{path}", json=body,
                                                           headers=headers, timeout=10) as response:
            response.read()
    assert len(received_for(mock, body["messages"][0]["content"])) == 2
    assert entry_keys(proxy) == set()


def set_clock(path: Path, when: str) -> None:
    path.write_text(when)


def test_max_age_sets_the_lifetime_and_is_clamped_to_a_year(start_proxy, mock: MockProvider, tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    set_clock(clock, "2026-01-01T00:00:00Z")
    proxy = start_proxy(env={"METRION_CLOCK_FILE": str(clock)})
    who = label()
    short, default, clamped = ({"cache-control": "max-age=60"}, {}, {"cache-control": "max-age=999999999999"})
    for n, headers in enumerate((short, default, clamped)):
        miss = chat(proxy, f"{who}-{n}", headers=headers)
        assert miss.headers["x-metrion-cache"] == "MISS"
        wait_for_entry(proxy, mock, miss.headers)

    def outcomes() -> list[str]:
        return [chat(proxy, f"{who}-{n}").headers["x-metrion-cache"] for n in range(3)]

    set_clock(clock, "2026-01-01T00:00:59Z")
    assert outcomes() == ["HIT", "HIT", "HIT"]
    set_clock(clock, "2026-01-01T00:01:00Z")
    assert outcomes()[0] == "MISS"
    set_clock(clock, "2026-01-07T23:59:59Z")
    assert outcomes()[1:] == ["HIT", "HIT"]
    set_clock(clock, "2026-01-08T00:00:00Z")
    assert outcomes()[1:] == ["MISS", "HIT"]
    set_clock(clock, "2027-01-01T00:00:00Z")  # 365 days later: the clamped entry has expired too
    assert outcomes()[2] == "MISS"


def test_a_hit_counts_against_the_rate_limit_but_not_the_monthly_cap(start_proxy, mock: MockProvider,
                                                                      tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    set_clock(clock, "2026-03-10T12:00:00Z")
    capped = token(11)
    proxy = start_proxy(env={"METRION_CLOCK_FILE": str(clock)}, rate_limit=4,
                        plans={"two": {"monthly_requests": 2}},
                        tokens=[{"name": "capped", "token": capped, "plan": "two", "keys": {"openai": "k"}}])
    who = label()
    first = chat(proxy, who, key=capped)
    assert first.headers["x-metrion-cache"] == "MISS"
    wait_for_entry(proxy, mock, first.headers)
    answers = [chat(proxy, who, key=capped) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]  # a runaway loop is throttled: 4 a minute
    assert answers[-1].json()["error"]["code"] == "rate_limit_exceeded"
    assert "x-metrion-cache" not in answers[-1].headers
    statuses = [row["cache_status"] for row in proxy.rows("requester = ?", (who,), n=5)]
    assert statuses == ["MISS", "HIT", "HIT", "HIT", None]  # the refused one was told nothing
    assert answers[0].headers["x-metrion-quota-remaining"] == "1"  # hits leave the monthly count alone
    set_clock(clock, "2026-03-10T12:01:00Z")  # a minute later the bucket is full again
    fresh = chat(proxy, label(), key=capped)
    assert fresh.status_code == 200 and fresh.headers["x-metrion-cache"] == "MISS"
    assert fresh.headers["x-metrion-quota-remaining"] == "0"
    assert chat(proxy, label(), key=capped).json()["error"]["code"] == "monthly_quota_exceeded"
    assert chat(proxy, who, key=capped).headers["x-metrion-cache"] == "HIT"  # over the cap, hits still answer
    assert len(received_for(mock, who)) == 1


def test_entries_survive_a_restart_and_the_least_recently_used_go_at_the_size_bound(
        start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy()
    who = label()
    first = chat(proxy, f"{who}-0")
    key = wait_for_entry(proxy, mock, first.headers)
    with sqlite3.connect(proxy.db_path) as conn:
        (size,) = conn.execute("SELECT size FROM cache_entries WHERE key = ?", (key,)).fetchone()
    proxy.config["cache"] = {"max_mb": 9.5 * size / 1024 / 1024}  # nine of these replies fit, ten do not
    proxy.restart()
    again = chat(proxy, f"{who}-0")
    assert again.headers["x-metrion-cache"] == "HIT" and again.content == first.content  # kept across the restart
    assert len(received_for(mock, f"{who}-0")) == 1
    for n in range(1, 9):
        wait_for_entry(proxy, mock, chat(proxy, f"{who}-{n}").headers)
    assert chat(proxy, f"{who}-0").headers["x-metrion-cache"] == "HIT"  # 0 is now the most recently used
    time.sleep(0.2)  # the touch is written in the writer's next batch
    wait_for_entry(proxy, mock, chat(proxy, f"{who}-9").headers)
    with sqlite3.connect(proxy.db_path) as conn:
        assert conn.execute("SELECT count(*), total(size) FROM cache_entries").fetchone() == (9, 9 * size)
    assert [chat(proxy, f"{who}-{n}").headers["x-metrion-cache"] for n in (0, *range(2, 10))] == ["HIT"] * 9
    assert chat(proxy, f"{who}-1").headers["x-metrion-cache"] == "MISS"


def test_metrics_count_cache_outcomes_and_savings(proxy: Proxy, mock: MockProvider) -> None:
    def figures() -> tuple[float, float, float]:
        text = httpx.get(f"{proxy.url}/metrion/metrics", timeout=10).text
        found = {(s.name, s.labels.get("outcome")): s.value for family in text_string_to_metric_families(text)
                 for s in family.samples}
        outcomes = [found.get(("metrion_cache_requests_total", outcome), 0.0) for outcome in ("HIT", "MISS")]
        return outcomes[0], outcomes[1], found.get(("metrion_cache_saved_usd_total", None), 0.0)

    hits, misses, saved = figures()
    who = label()
    first = chat(proxy, who)
    wait_for_entry(proxy, mock, first.headers)
    assert chat(proxy, who).headers["x-metrion-cache"] == "HIT"
    miss, _ = proxy.rows("requester = ?", (who,), n=2)
    deadline = time.monotonic() + 5
    while figures()[0] < hits + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    now_hits, now_misses, now_saved = figures()
    assert (now_hits - hits, now_misses - misses) == (1, 1)
    assert now_saved - saved == pytest.approx(miss["cost_usd"])
