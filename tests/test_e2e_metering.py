"""End to end: the official SDKs and raw HTTP through a real mitmdump running the addon, against the mock.

Each test checks that the client got exactly what the upstream sent and that the row holds exactly its usage.
"""

from __future__ import annotations

import json
import uuid

import anthropic
import genai_prices
import httpx
import openai
import pytest
from harness import APP_TOKEN, CLIENT_KEY, PASS_TOKEN, STORED_KEYS, Proxy

from metrion_addon.mock_provider import MockProvider, expected_usage, reply_text
from metrion_addon.sse import SSEDecoder
from metrion_addon.usage import normalize

MODELS = {
    "anthropic": "claude-sonnet-4-20250514",
    "openai": "gpt-4o",
    "gemini": "gemini-2.5-flash",
    "mistral": "mistral-small-latest",
    "grok": "grok-3-mini",
}
RETURNED = {**MODELS, "openai": "gpt-4o-2024-08-06"}
PROVIDERS = list(MODELS)


def label() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def sdk(proxy: Proxy, provider: str, mode: str, requester: str, base: str | None = None):
    headers = {"x-metrion-user": requester}
    key = APP_TOKEN
    if mode == "pass-through":
        headers["x-metrion-token"] = PASS_TOKEN
        key = CLIENT_KEY
    if provider == "anthropic":
        return anthropic.Anthropic(base_url=base or f"{proxy.url}/api/proxy", api_key=key,
                                   default_headers=headers, max_retries=0)
    return openai.OpenAI(base_url=base or f"{proxy.url}/api/proxy/{provider}/v1", api_key=key,
                         default_headers=headers, max_retries=0)


def ask(client, provider: str, text: str, stream: bool) -> str:
    """Send one chat request through the SDK; return the reply text the client assembled."""
    messages = [{"role": "user", "content": text}]
    if provider == "anthropic":
        if stream:
            with client.messages.stream(model=MODELS[provider], max_tokens=64, messages=messages) as events:
                return "".join(events.text_stream)
        return client.messages.create(model=MODELS[provider], max_tokens=64, messages=messages).content[0].text
    if stream:
        chunks = client.chat.completions.create(model=MODELS[provider], messages=messages, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(model=MODELS[provider], messages=messages).choices[0].message.content


def expected_row_usage(provider: str, text: str) -> dict:
    body = {"model": MODELS[provider], "messages": [{"role": "user", "content": text}], "max_tokens": 64}
    usage = normalize(provider, expected_usage(provider, "messages" if provider == "anthropic" else "chat", body))
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cache_read_tokens": usage.cache_read_tokens, "cache_write_tokens": usage.cache_write_tokens,
            "reasoning_tokens": usage.reasoning_tokens, "total_tokens": usage.total_tokens}


def received_for(mock: MockProvider, requester_text: str):
    return [r for r in mock.received if requester_text.encode() in r.body]


@pytest.mark.parametrize("mode", ["stored", "pass-through"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sdk_call_is_forwarded_and_metered_exactly(proxy: Proxy, mock: MockProvider, provider, stream, mode) -> None:
    requester = label()
    text = f"please echo {requester}"
    reply = ask(sdk(proxy, provider, mode, requester), provider, text, stream)

    assert reply == reply_text({"messages": [{"role": "user", "content": text}]})
    (row,) = proxy.rows("requester = ?", (requester,))
    assert row | expected_row_usage(provider, text) == row
    assert (row["provider"], row["model"], row["status"], row["stream"]) == (provider, RETURNED[provider], 200, stream)
    assert row["requested_model"] == MODELS[provider]
    assert (row["usage_source"], row["error"]) == ("provider", None)
    assert (row["token_name"], row["auth_mode"]) == (("app", "stored") if mode == "stored" else ("passthrough", mode))
    assert row["latency_ms"] >= row["ttfb_ms"] > 0

    (sent,) = received_for(mock, requester)
    credential = sent.headers.get("x-api-key") or sent.headers["authorization"].removeprefix("Bearer ")
    assert credential == (STORED_KEYS[provider] if mode == "stored" else CLIENT_KEY)
    assert not [name for name in sent.headers if name.startswith("x-metrion-")]
    assert sent.headers["accept-encoding"] == "identity"
    body = json.loads(sent.body)
    injected = stream and provider in ("openai", "grok")
    assert ("stream_options" in body) is injected


@pytest.mark.parametrize("provider", PROVIDERS)
def test_json_response_reaches_the_client_byte_for_byte(proxy: Proxy, mock: MockProvider, provider: str) -> None:
    path, body, headers = request_for(provider, stream=False)
    response = httpx.post(f"{proxy.url}{path}", json=body, headers=headers)
    assert response.status_code == 200
    assert response.content == mock.sent[response.headers["x-mock-id"]]


def request_for(provider: str, stream: bool, **extra: object) -> tuple[str, dict, dict]:
    body = {"model": MODELS[provider], "messages": [{"role": "user", "content": f"raw {label()}"}], **extra}
    if stream:
        body["stream"] = True
    if provider == "anthropic":
        return "/api/proxy/v1/messages", {**body, "max_tokens": 64}, {"x-api-key": APP_TOKEN}
    return f"/api/proxy/{provider}/v1/chat/completions", body, {"authorization": f"Bearer {APP_TOKEN}"}


def without_usage_chunk(stream: bytes) -> bytes:
    events = SSEDecoder().feed(stream)
    return b"".join(e.raw for e in events if not (e.data and e.data.startswith("{") and
                                                  json.loads(e.data).get("choices") == []))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_stream_reaches_the_client_as_sent(proxy: Proxy, mock: MockProvider, provider: str) -> None:
    path, body, headers = request_for(provider, stream=True)
    with httpx.stream("POST", f"{proxy.url}{path}", json=body, headers=headers) as response:
        received = response.read()
    sent = mock.sent[response.headers["x-mock-id"]]
    # Metrion asked OpenAI and xAI for usage the client did not ask for: only that chunk is held back.
    assert received == (without_usage_chunk(sent) if provider in ("openai", "grok") else sent)


def test_stream_with_client_requested_usage_is_untouched(proxy: Proxy, mock: MockProvider) -> None:
    path, body, headers = request_for("openai", stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{proxy.url}{path}", json=body, headers=headers) as response:
        received = response.read()
    sent = mock.sent[response.headers["x-mock-id"]]
    assert received == sent and b'"choices":[]' in sent.replace(b" ", b"")
    assert json.loads(mock.received[-1].body) == body


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_events_are_forwarded_one_by_one_without_waiting_for_the_next(
    proxy: Proxy, mock: MockProvider, provider: str
) -> None:
    # The mock sends the next event only after the test has seen the previous one: buffering would hang here.
    key = label()
    path, body, headers = request_for(provider, stream=True)
    decoder = SSEDecoder()
    seen = 0
    headers = {**headers, "x-mock-scenario": f"lockstep:{key}"}
    with httpx.stream("POST", f"{proxy.url}{path}", json=body, headers=headers, timeout=10) as response:
        for chunk in response.iter_raw():
            events = [e for e in decoder.feed(chunk) if e.data]
            seen += len(events)
            for event in events:
                mock.release(key)
                if '"finish_reason":"stop"' in event.data and provider == "openai":
                    mock.release(key)  # the usage-only chunk that follows is Metrion's, held back by design
    assert seen >= 5


def test_http_proxy_with_any_host_name_works(proxy: Proxy, mock: MockProvider, monkeypatch) -> None:
    requester = label()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = sdk(proxy, "openai", "stored", requester, base="http://metrion.local/api/proxy/openai/v1")
    assert ask(client, "openai", f"via proxy {requester}", stream=True).startswith("Echo: via proxy")
    client = sdk(proxy, "anthropic", "stored", requester, base="http://metrion.local/api/proxy")
    assert ask(client, "anthropic", f"via proxy {requester}", stream=False).startswith("Echo: via proxy")
    rows = proxy.rows("requester = ?", (requester,), n=2)
    assert [(r["provider"], r["usage_source"]) for r in rows] == [("openai", "provider"), ("anthropic", "provider")]


def test_other_endpoints_are_forwarded_and_metered(proxy: Proxy) -> None:
    requester = label()
    client = sdk(proxy, "openai", "stored", requester)
    embedding = client.embeddings.create(model="text-embedding-3-small", input=["one two three", "four"])
    assert len(embedding.data) == 2
    response = client.responses.create(model="gpt-4.1", input=f"hello {requester}")
    assert response.output_text.startswith("Echo: hello")
    assert [m.id for m in client.models.list()]
    claude = sdk(proxy, "anthropic", "stored", requester)
    assert claude.messages.count_tokens(model=MODELS["anthropic"], messages=[{"role": "user", "content": "hi"}])
    rows = proxy.rows("requester = ?", (requester,), n=4)
    by_path = {r["path"].split("/")[-1]: r for r in rows}
    assert by_path["embeddings"]["input_tokens"] == embedding.usage.prompt_tokens
    assert by_path["responses"]["output_tokens"] == response.usage.output_tokens
    assert by_path["models"]["usage_source"] == "none" and by_path["models"]["status"] == 200
    assert by_path["count_tokens"]["usage_source"] == "none"


def test_provider_that_ignores_identity_encoding_is_still_metered(proxy: Proxy, mock: MockProvider) -> None:
    path, body, headers = request_for("openai", stream=False)
    response = httpx.post(f"{proxy.url}{path}", json=body, headers={**headers, "x-mock-scenario": "gzip",
                                                                    "x-metrion-user": (who := label())})
    assert response.json()["usage"]["prompt_tokens"] > 0
    assert mock.received[-1].headers["accept-encoding"] == "identity"
    assert proxy.rows("requester = ?", (who,))[0]["usage_source"] == "provider"


def test_missing_usage_is_estimated(proxy: Proxy) -> None:
    who = label()
    for stream in (False, True):
        path, body, headers = request_for("mistral", stream=stream)
        httpx.post(f"{proxy.url}{path}", json=body, headers={**headers, "x-mock-scenario": "no-usage",
                                                             "x-metrion-user": who}).raise_for_status()
    rows = proxy.rows("requester = ?", (who,), n=2)
    assert [r["usage_source"] for r in rows] == ["estimated", "estimated"]
    assert all(r["input_tokens"] > 0 and r["output_tokens"] > 0 for r in rows)


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_upstream_cut_mid_stream_leaves_a_row_with_partial_usage(proxy: Proxy, provider: str) -> None:
    who = label()
    path, body, headers = request_for(provider, stream=True)
    with pytest.raises(httpx.HTTPError), httpx.stream(
        "POST", f"{proxy.url}{path}", json=body,
        headers={**headers, "x-mock-scenario": "cut-after:3", "x-metrion-user": who},
    ) as response:
        response.read()
    (row,) = proxy.rows("requester = ?", (who,))
    assert row["status"] == 200 and row["error"]
    assert row["usage_source"] == "estimated" and row["output_tokens"] > 0
    if provider == "anthropic":  # message_start had already reported the input tokens
        assert row["input_tokens"] == expected_row_usage(provider, body["messages"][0]["content"])["input_tokens"]


def test_client_that_disconnects_mid_stream_still_gets_a_row(proxy: Proxy, mock: MockProvider) -> None:
    who, key = label(), label()
    path, body, headers = request_for("anthropic", stream=True)
    with httpx.stream("POST", f"{proxy.url}{path}", json=body,
                      headers={**headers, "x-mock-scenario": f"lockstep:{key}", "x-metrion-user": who}) as response:
        next(response.iter_raw())
    (row,) = proxy.rows("requester = ?", (who,))
    assert row["error"] == "client disconnected before the response finished"
    assert row["input_tokens"] > 0 and row["usage_source"] == "estimated"
    for _ in range(10):
        mock.release(key)


def test_provider_errors_pass_through_and_are_logged(proxy: Proxy, mock: MockProvider) -> None:
    who = label()
    path, body, headers = request_for("anthropic", stream=False)
    response = httpx.post(f"{proxy.url}{path}", json=body,
                          headers={**headers, "x-mock-scenario": "error-429", "x-metrion-user": who})
    assert response.status_code == 429 and response.content == mock.sent[response.headers["x-mock-id"]]
    assert response.headers["retry-after"] == "1"
    (row,) = proxy.rows("requester = ?", (who,))
    assert row["status"] == 429 and row["error"].startswith("provider: ")


TERMINAL = {"anthropic": b"message_stop", "openai": b"[DONE]", "gemini": b"finish_reason", "mistral": b"[DONE]",
            "grok": b"[DONE]"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_client_leaving_right_after_the_terminal_event_is_a_complete_request(proxy: Proxy, provider: str) -> None:
    # The upstream keeps the body open after its last event; the client closes as soon as it has the terminal one.
    who = label()
    path, body, headers = request_for(provider, stream=True)
    received = b""
    with httpx.stream("POST", f"{proxy.url}{path}", json=body, timeout=10,
                      headers={**headers, "x-mock-scenario": "hold-end:5", "x-metrion-user": who}) as response:
        for chunk in response.iter_raw():
            received += chunk
            if TERMINAL[provider] in received.replace(b'"finish_reason":null', b""):
                break
    (row,) = proxy.rows("requester = ?", (who,))
    assert (row["status"], row["error"], row["usage_source"]) == (200, None, "provider")
    assert row | expected_row_usage(provider, body["messages"][0]["content"]) == row


def test_client_leaving_right_after_response_completed_is_a_complete_request(proxy: Proxy) -> None:
    # The Responses API has no [DONE]: its terminal event is response.completed (or .incomplete, .failed).
    who = label()
    body = {"model": MODELS["openai"], "input": f"responses {who}", "stream": True}
    received = b""
    with httpx.stream("POST", f"{proxy.url}/api/proxy/openai/v1/responses", json=body, timeout=10,
                      headers={"authorization": f"Bearer {APP_TOKEN}", "x-mock-scenario": "hold-end:5",
                               "x-metrion-user": who}) as response:
        for chunk in response.iter_raw():
            received += chunk
            if b"response.completed" in received and received.endswith(b"\n\n"):
                break
    (row,) = proxy.rows("requester = ?", (who,))
    usage = normalize("openai", expected_usage("openai", "responses", body))
    assert (row["status"], row["error"], row["usage_source"]) == (200, None, "provider")
    assert (row["input_tokens"], row["output_tokens"]) == (usage.input_tokens, usage.output_tokens)


def test_openai_sdk_closing_its_stream_on_done_leaves_no_error(proxy: Proxy) -> None:
    who = label()
    client = sdk(proxy, "openai", "stored", who)
    messages = [{"role": "user", "content": f"sdk closes {who}"}]
    chunks = client.with_options(timeout=10).chat.completions.create(
        model="gpt-4o", messages=messages, stream=True, extra_headers={"x-mock-scenario": "hold-end:5"})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # returns at [DONE], closes
    assert text == reply_text({"messages": messages})
    (row,) = proxy.rows("requester = ?", (who,))
    assert (row["error"], row["status"], row["usage_source"]) == (None, 200, "provider")
    assert row | expected_row_usage("openai", messages[0]["content"]) == row


def test_logs_model_filter_matches_the_model_asked_for_and_the_one_answered(proxy: Proxy) -> None:
    who = label()
    client = sdk(proxy, "openai", "stored", who)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"x-mock-scenario": "error-429"})
    rows = proxy.rows("requester = ?", (who,), n=2)
    assert [(r["model"], r["requested_model"], r["status"]) for r in rows] == [
        ("gpt-4o-2024-08-06", "gpt-4o", 200), ("gpt-4o", "gpt-4o", 429)]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_multi_step_usage_is_metered_as_billed(proxy: Proxy, stream: bool) -> None:
    # A compaction step runs before the answer: the top-level usage leaves it out, usage.iterations lists it.
    who = label()
    claude = sdk(proxy, "anthropic", "stored", who)
    request = {"model": MODELS["anthropic"], "max_tokens": 64, "messages": [{"role": "user", "content": f"long {who}"}],
               "extra_headers": {"x-mock-scenario": "iterations"}}
    if stream:
        with claude.beta.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = claude.beta.messages.create(**request)
    steps = message.usage.iterations
    assert [step.type for step in steps] == ["compaction", "message"]
    assert message.usage.input_tokens == steps[1].input_tokens  # what a top-level-only meter would have billed
    (row,) = proxy.rows("requester = ?", (who,))
    cache_read = sum(step.cache_read_input_tokens for step in steps)
    cache_write = sum(step.cache_creation_input_tokens for step in steps)
    billed = genai_prices.Usage(
        input_tokens=sum(step.input_tokens for step in steps) + cache_read + cache_write,
        cache_read_tokens=cache_read, cache_write_tokens=cache_write,
        output_tokens=sum(step.output_tokens for step in steps))
    assert (row["input_tokens"], row["output_tokens"], row["usage_source"]) == (
        billed.input_tokens, billed.output_tokens, "provider")
    price = genai_prices.calc_price(billed, MODELS["anthropic"], provider_id="anthropic").total_price
    assert row["cost_usd"] == pytest.approx(float(price), rel=1e-9)
