"""Gemini's native API through Metrion: the google-genai SDK by base URL and by HTTPS_PROXY, raw HTTP with ?key=,
both stream shapes (SSE and the streamed JSON array), countTokens and embeddings, each metered from usageMetadata."""

from __future__ import annotations

import json

import httpx
import pytest
from google import genai
from google.genai import errors, types
from harness import APP_TOKEN, CLIENT_KEY, PASS_TOKEN, STORED_KEYS, Proxy
from test_e2e_forward_proxy import forward_proxy, proxied  # noqa: F401  (the module's proxy fixture)
from test_e2e_metering import label

from metrion_addon.mock_provider import MockProvider, gemini_usage, reply_text
from metrion_addon.usage import normalize

MODEL = "gemini-2.5-flash"


def client(proxy: Proxy, who: str, mode: str = "stored") -> genai.Client:
    headers = {"x-metrion-user": who}
    if mode == "pass-through":
        headers["x-metrion-token"] = PASS_TOKEN
    return genai.Client(api_key=APP_TOKEN if mode == "stored" else CLIENT_KEY, http_options=types.HttpOptions(
        base_url=f"{proxy.url}/api/proxy/gemini", headers=headers, timeout=10_000))


def row_usage(text: str) -> dict:
    usage = normalize("gemini", gemini_usage(MODEL, {"contents": [{"role": "user", "parts": [{"text": text}]}]}))
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "reasoning_tokens": usage.reasoning_tokens, "cache_read_tokens": usage.cache_read_tokens,
            "total_tokens": usage.total_tokens}


def sent_for(mock: MockProvider, who: str):
    return [r for r in mock.received if who.encode() in r.body]


@pytest.mark.parametrize("mode", ["stored", "pass-through"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_google_genai_sdk_by_base_url_is_metered_from_usage_metadata(
    proxy: Proxy, mock: MockProvider, stream: bool, mode: str
) -> None:
    who = label()
    text = f"native {who}"
    gemini = client(proxy, who, mode)
    if stream:
        reply = "".join(c.text or "" for c in gemini.models.generate_content_stream(model=MODEL, contents=text))
    else:
        reply = gemini.models.generate_content(model=MODEL, contents=text).text
    assert reply == reply_text({"contents": [{"role": "user", "parts": [{"text": text}]}]})

    (row,) = proxy.rows("requester = ?", (who,))
    assert row | row_usage(text) == row
    assert (row["provider"], row["model"], row["requested_model"], row["status"]) == ("gemini", MODEL, MODEL, 200)
    assert (row["usage_source"], row["error"], row["stream"]) == ("provider", None, stream)
    assert row["cost_usd"] > 0 and row["auth_mode"] == mode
    (sent,) = sent_for(mock, who)
    assert sent.path.endswith(f"/models/{MODEL}:{'streamGenerateContent' if stream else 'generateContent'}")
    assert sent.headers["x-goog-api-key"] == (STORED_KEYS["gemini"] if mode == "stored" else CLIENT_KEY)
    assert not [name for name in sent.headers if name.startswith("x-metrion-")]


def test_count_tokens_and_embeddings_pass_with_the_model_from_the_path(proxy: Proxy) -> None:
    who = label()
    gemini = client(proxy, who)
    assert gemini.models.count_tokens(model=MODEL, contents="count these words").total_tokens == 6
    assert len(gemini.models.embed_content(model="gemini-embedding-001", contents=["a b", "c"]).embeddings) == 2
    single = httpx.post(f"{proxy.url}/api/proxy/gemini/v1beta/models/text-embedding-004:embedContent",
                        json={"content": {"parts": [{"text": "one text"}]}},
                        headers={"x-goog-api-key": APP_TOKEN, "x-metrion-user": who})
    assert single.status_code == 200 and single.json()["embedding"]["values"]
    rows = proxy.rows("requester = ?", (who,), n=3)
    assert [(r["path"].rsplit(":", 1)[1], r["model"], r["usage_source"], r["status"]) for r in rows] == [
        ("countTokens", MODEL, "none", 200), ("batchEmbedContents", "gemini-embedding-001", "none", 200),
        ("embedContent", "text-embedding-004", "none", 200)]


def test_query_key_is_swapped_like_the_header_and_never_stored(proxy: Proxy, mock: MockProvider) -> None:
    who = label()
    body = {"contents": [{"role": "user", "parts": [{"text": f"query key {who}"}]}]}
    path = f"/api/proxy/gemini/v1beta/models/{MODEL}:streamGenerateContent?alt=sse&key={APP_TOKEN}"
    with httpx.stream("POST", proxy.url + path, json=body, headers={"x-metrion-user": who}) as response:
        received = response.read()
    assert response.status_code == 200 and received == mock.sent[response.headers["x-mock-id"]]
    (sent,) = sent_for(mock, who)
    assert (sent.query, sent.headers["x-goog-api-key"]) == ("alt=sse", STORED_KEYS["gemini"])
    (row,) = proxy.rows("requester = ?", (who,))
    assert row["path"] == f"/api/proxy/gemini/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    assert row | row_usage(f"query key {who}") == row
    assert APP_TOKEN.encode() not in proxy.db_path.read_bytes() + proxy.log_path.read_bytes()


def test_streamed_json_array_reaches_the_client_as_sent_and_is_metered(proxy: Proxy, mock: MockProvider) -> None:
    who = label()
    text = f"array {who}"
    body = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    with httpx.stream("POST", f"{proxy.url}/api/proxy/gemini/v1beta/models/{MODEL}:streamGenerateContent",
                      json=body, headers={"x-goog-api-key": APP_TOKEN, "x-metrion-user": who}) as response:
        chunks = list(response.iter_raw())
    received = b"".join(chunks)
    assert received == mock.sent[response.headers["x-mock-id"]]
    assert len(json.loads(received)) == 3 and len(chunks) > 1  # streamed element by element, not buffered
    (row,) = proxy.rows("requester = ?", (who,))
    assert row | row_usage(text) == row
    assert (row["stream"], row["usage_source"], row["error"]) == (1, "provider", None)


def test_stream_cut_before_the_finish_reason_is_estimated_and_marked(proxy: Proxy) -> None:
    who = label()
    body = {"contents": [{"role": "user", "parts": [{"text": f"cut {who}"}]}]}
    with pytest.raises(httpx.HTTPError), httpx.stream(
        "POST", f"{proxy.url}/api/proxy/gemini/v1beta/models/{MODEL}:streamGenerateContent", json=body,
        headers={"x-goog-api-key": APP_TOKEN, "x-metrion-user": who, "x-mock-scenario": "cut-after:2"},
    ) as response:
        response.read()
    (row,) = proxy.rows("requester = ?", (who,))
    assert row["usage_source"] == "estimated" and row["error"] and row["input_tokens"] > 0


def test_metrion_refusal_raises_the_sdks_own_client_error(proxy: Proxy) -> None:
    who = label()
    gemini = genai.Client(api_key="sk-metrion-" + "9" * 32, http_options=types.HttpOptions(
        base_url=f"{proxy.url}/api/proxy/gemini", headers={"x-metrion-user": who}))
    with pytest.raises(errors.ClientError) as caught:
        gemini.models.generate_content(model=MODEL, contents="hi")
    assert (caught.value.code, caught.value.status) == (401, "UNAUTHENTICATED")
    assert proxy.rows("requester = ?", (who,))[0]["status"] == 401


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_google_genai_sdk_through_https_proxy_is_metered(
    forward_proxy: Proxy, mock: MockProvider, monkeypatch: pytest.MonkeyPatch, stream: bool  # noqa: F811
) -> None:
    proxied(monkeypatch, forward_proxy)
    for name in ("GOOGLE_GEMINI_BASE_URL", "GOOGLE_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    who = label()
    text = f"zero code {who}"
    gemini = genai.Client(api_key=CLIENT_KEY, http_options=types.HttpOptions(headers={"x-metrion-user": who}))
    if stream:
        reply = "".join(c.text or "" for c in gemini.models.generate_content_stream(model=MODEL, contents=text))
    else:
        reply = gemini.models.generate_content(model=MODEL, contents=text).text
    assert reply.startswith(f"Echo: {text}")
    (row,) = forward_proxy.rows("requester = ?", (who,))
    assert row | row_usage(text) == row
    assert (row["provider"], row["auth_mode"], row["token_name"], row["error"]) == ("gemini", "forward", "zero-code",
                                                                                   None)
    (sent,) = sent_for(mock, who)
    assert sent.headers["x-goog-api-key"] == CLIENT_KEY and "proxy-authorization" not in sent.headers


def test_a_key_query_parameter_is_left_alone_for_other_providers(proxy: Proxy, mock: MockProvider) -> None:
    who = label()
    response = httpx.post(f"{proxy.url}/api/proxy/openai/v1/chat/completions?key=not-a-google-key",
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": f"q {who}"}]},
                          headers={"authorization": f"Bearer {APP_TOKEN}"})
    assert response.status_code == 200
    (sent,) = sent_for(mock, who)
    assert sent.query == "key=not-a-google-key" and "x-goog-api-key" not in sent.headers
