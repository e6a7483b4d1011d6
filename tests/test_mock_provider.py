"""Quick self-tests of metrion_addon/mock_provider.py through the official SDKs and raw sockets.
They pin the mock's wire formats so end-to-end proxy tests can rely on them."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from metrion_addon.mock_provider import MockProvider, expected_usage, reply_text, response_model


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProvider]:
    server = MockProvider()
    server.start()
    yield server
    server.stop()


def _oai(mock: MockProvider, provider: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=mock.base_url(provider), api_key=f"key-{provider}", max_retries=0, default_headers=headers
    )


def _ant(mock: MockProvider, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{mock.port}/anthropic",
        api_key="key-anthropic",
        max_retries=0,
        default_headers=headers,
    )


def _raw(mock: MockProvider, path: str, body: dict[str, Any], **headers: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=5)
    conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json", **headers})
    return conn.getresponse()


def _dump(usage: Any) -> dict[str, Any]:
    return usage.model_dump(exclude_none=True) if usage is not None else {}


CHAT = {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "héllo there"}]}
MODELS = {
    "openai": "gpt-4o",
    "gemini": "gemini-2.5-flash",
    "mistral": "mistral-small-latest",
    "grok": "grok-3-mini",
}


@pytest.mark.parametrize("provider", list(MODELS))
def test_chat_non_streaming(mock: MockProvider, provider: str) -> None:
    body = {"model": MODELS[provider], **CHAT}
    resp = _oai(mock, provider).chat.completions.create(**body)  # type: ignore[call-overload]
    assert resp.choices[0].message.content == reply_text(body) == "Echo: héllo there 😀"
    assert resp.model == response_model(provider, MODELS[provider])
    assert _dump(resp.usage) == expected_usage(provider, "chat/completions", body)
    last = mock.received[-1]
    assert last.headers["authorization"] == f"Bearer key-{provider}"
    assert json.loads(mock.sent[last.id])["usage"] == expected_usage(provider, "chat/completions", body)


@pytest.mark.parametrize("provider", ["openai", "gemini", "mistral", "grok"])
def test_chat_streaming(mock: MockProvider, provider: str) -> None:
    body: dict[str, Any] = {"model": MODELS[provider], **CHAT, "stream": True}
    if provider != "mistral":
        body["stream_options"] = {"include_usage": True}
    chunks = list(_oai(mock, provider).chat.completions.create(**body))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply_text(body)
    usages = [c.usage for c in chunks if c.usage is not None]
    assert usages[-1].model_dump(exclude_none=True) == expected_usage(provider, "chat/completions", body)
    sent = mock.sent[mock.received[-1].id]
    assert sent.endswith(b"data: [DONE]\r\n\r\n" if provider == "gemini" else b"data: [DONE]\n\n")
    assert sent.startswith(b": keep-alive\n\n") == (provider in ("openai", "mistral"))


def test_openai_usage_chunk_only_when_asked(mock: MockProvider) -> None:
    body = {"model": "o3-mini", **CHAT, "stream": True}
    chunks = list(_oai(mock, "openai").chat.completions.create(**body))  # type: ignore[call-overload]
    assert all(c.usage is None and c.choices for c in chunks)
    assert b'"usage"' not in mock.sent[mock.received[-1].id]
    usage = expected_usage("openai", "chat/completions", body)
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 64
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_anthropic(mock: MockProvider) -> None:
    client = _ant(mock)
    system = [{"type": "text", "text": "big prefix", "cache_control": {"type": "ephemeral"}}]
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 100,
        "system": system,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    msg = client.messages.create(**body)
    assert msg.content[0].text == "Echo: hi 😀"  # type: ignore[union-attr]
    usage = expected_usage("anthropic", "messages", body)
    assert usage["cache_read_input_tokens"] == 1024
    assert msg.usage.model_dump(exclude_none=True) == usage
    # anthropic SDK 2.x sends the API key as `authorization: Bearer`; older ones as `x-api-key`
    auth = mock.received[-1].headers
    assert "key-anthropic" in auth.get("x-api-key", "") + auth.get("authorization", "")

    with client.messages.stream(**body) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == reply_text(body)
    assert final.usage.output_tokens == usage["output_tokens"]
    assert final.usage.cache_read_input_tokens == 1024
    assert not mock.sent[mock.received[-1].id].rstrip().endswith(b"[DONE]")

    count = client.messages.count_tokens(model=body["model"], messages=body["messages"], system=system)
    assert count.input_tokens == expected_usage("anthropic", "count_tokens", body)["input_tokens"]


def test_anthropic_in_stream_error(mock: MockProvider) -> None:
    client = _ant(mock, **{"x-mock-scenario": "in-stream-error"})
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        client.messages.stream(
            model="claude-sonnet-4-20250514", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        ) as stream,
    ):
        list(stream.text_stream)


def test_responses_and_embeddings(mock: MockProvider) -> None:
    client = _oai(mock, "openai")
    body = {"model": "gpt-4o", "input": "say something"}
    resp = client.responses.create(**body)  # type: ignore[call-overload]
    assert resp.output_text == reply_text(body)
    assert resp.model == "gpt-4o-2024-08-06"
    assert resp.usage is not None and _dump(resp.usage) == expected_usage("openai", "responses", body)

    events = list(client.responses.create(**body, stream=True))  # type: ignore[call-overload]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == reply_text(body)
    assert events[-1].type == "response.completed"
    assert _dump(events[-1].response.usage) == expected_usage("openai", "responses", body)

    emb = _oai(mock, "mistral").embeddings.create(model="mistral-embed", input=["a b", "c"])
    assert [len(d.embedding) for d in emb.data] == [8, 8]
    assert emb.usage.model_dump() == {"prompt_tokens": 6, "total_tokens": 6}


def test_utf8_char_split_across_writes(mock: MockProvider) -> None:
    """The 4-byte emoji must arrive in two HTTP chunks; read raw chunked framing to prove it."""
    body = json.dumps({"model": "gpt-4o", "stream": True, **CHAT}).encode()
    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as sock:
        head = (
            f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    chunked = raw.split(b"\r\n\r\n", 1)[1]
    pieces: list[bytes] = []
    while True:
        size_line, _, rest = chunked.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        pieces.append(rest[:size])
        chunked = rest[size + 2 :]
    emoji = "😀".encode()
    assert not any(emoji in p for p in pieces)
    assert any(p.endswith(emoji[:1]) for p in pieces)
    assert b"".join(pieces) == mock.sent[mock.received[-1].id]
    assert emoji in b"".join(pieces)


def test_lockstep(mock: MockProvider) -> None:
    client = _oai(mock, "openai", **{"x-mock-scenario": "lockstep:k1"})
    got: list[str] = []
    done = threading.Event()

    def consume() -> None:
        for c in client.chat.completions.create(model="gpt-4o", stream=True, **CHAT):  # type: ignore[call-overload]
            got.append(c.choices[0].delta.content or "")
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + 2
    while not got and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(got) == 1 and not done.wait(0.1)  # held after the first event
    mock.release("k1")
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(got) == 2 and not done.is_set()
    for _ in range(10):
        mock.release("k1")
    assert done.wait(2)
    assert "".join(got) == reply_text(CHAT)


def test_mistral_rejects_stream_options(mock: MockProvider) -> None:
    client = _oai(mock, "mistral")
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.chat.completions.create(
            model="mistral-small-latest", stream=True, stream_options={"include_usage": True}, **CHAT
        )  # type: ignore[call-overload]
    assert exc.value.body["message"]["detail"][0]["type"] == "extra_forbidden"  # type: ignore[index]


@pytest.mark.parametrize(
    ("provider", "path"),
    [("anthropic", "/anthropic/v1/messages"), ("gemini", "/gemini/v1beta/openai/chat/completions")],
)
def test_error_scenarios(mock: MockProvider, provider: str, path: str) -> None:
    resp = _raw(mock, path, {"model": "m", **CHAT}, **{"x-mock-scenario": "error-429"})
    data = json.loads(resp.read())
    assert resp.status == 429 and resp.getheader("retry-after") == "1"
    assert (
        (data["error"]["type"] == "rate_limit_error") if provider == "anthropic" else isinstance(data, list)
    )
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=5)
    conn.request("POST", path, body=b"{nope")
    assert conn.getresponse().status == 400


def test_cut_stall_reset_gzip(mock: MockProvider) -> None:
    body = {"model": "gpt-4o", "stream": True, **CHAT}
    resp = _raw(mock, "/openai/v1/chat/completions", body, **{"x-mock-scenario": "cut-after:2"})
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    resp = _raw(mock, "/openai/v1/chat/completions", body, **{"x-mock-scenario": "stall-after:1"})
    resp.fp.raw._sock.settimeout(0.2)  # type: ignore[union-attr]
    with pytest.raises(TimeoutError):
        resp.read()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        _raw(mock, "/openai/v1/chat/completions", body, **{"x-mock-scenario": "reset"})
    plain = {"model": "gpt-4o", **CHAT}
    resp = _raw(
        mock, "/openai/v1/chat/completions", plain, **{"x-mock-scenario": "gzip", "accept-encoding": "gzip"}
    )
    assert resp.getheader("content-encoding") == "gzip" and resp.read()[:2] == b"\x1f\x8b"
    resp = _raw(mock, "/openai/v1/chat/completions", plain, **{"x-mock-scenario": "gzip,no-usage"})
    assert resp.getheader("content-encoding") is None and "usage" not in json.loads(resp.read())


@pytest.mark.parametrize(
    ("words", "cache_key", "cached"),
    [
        (2000, "team-faq", 2003 * 3 // 4 // 128 * 128),  # 1,502 tokens → 1,408 in 128-token steps
        (1021, "team-faq", 768),  # exactly 1,024 prompt tokens: the smallest prompt OpenAI caches
        (1020, "team-faq", 32),  # below 1,024: no prompt cache, the mock's old long-prompt rule
        (2000, None, 32),
    ],
)
def test_openai_prompt_cache_reads_three_quarters_of_a_long_prompt_named_by_prompt_cache_key(
    mock: MockProvider, words: int, cache_key: str | None, cached: int
) -> None:
    client = _oai(mock, "openai")
    extra = {"prompt_cache_key": cache_key} if cache_key else {}
    prompt = " ".join(["word"] * words)

    chat = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": prompt}], **extra)
    response = client.responses.create(model="gpt-4o", input=prompt, **extra)

    assert chat.usage.prompt_tokens == words + 3
    assert chat.usage.prompt_tokens_details.cached_tokens == cached
    assert response.usage.input_tokens_details.cached_tokens == (0 if cached == 32 else cached)


def test_runs_alone_as_the_readme_says() -> None:
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "metrion_addon.mock_provider", "--port", str(port)],
                               stdout=subprocess.PIPE, text=True)
    try:
        urls = dict(process.stdout.readline().split() for _ in range(5))
        assert set(urls) >= {"anthropic", "openai", "gemini", "mistral", "grok"}
        with openai.OpenAI(base_url=urls["openai"], api_key="sk-any", max_retries=0) as client:
            reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == reply_text({"messages": [{"role": "user", "content": "hi"}]})
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(10) == 0
