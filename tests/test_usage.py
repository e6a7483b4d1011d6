"""Usage is read exactly as each provider reports it, from JSON bodies and from streams split anywhere."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metrion_addon.metering import StreamTap
from metrion_addon.mock_provider import MockProvider, expected_usage
from metrion_addon.sse import Event, SSEDecoder
from metrion_addon.usage import StreamUsage, Usage, estimate, from_body, normalize


@pytest.mark.parametrize(
    ("provider", "raw", "expected"),
    [
        (  # Anthropic leaves cached tokens out of input_tokens
            "anthropic",
            {"input_tokens": 12, "cache_creation_input_tokens": 2048, "cache_read_input_tokens": 100,
             "output_tokens": 9, "output_tokens_details": {"thinking_tokens": 4}},
            Usage(2160, 9, 100, 2048, 4),
        ),
        (  # OpenAI counts cached inside prompt and reasoning inside completion
            "openai",
            {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
             "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 10}},
            Usage(1117, 46, 1024, 0, 10),
        ),
        (  # xAI leaves reasoning out of completion but bills it as output
            "grok",
            {"prompt_tokens": 32, "completion_tokens": 9, "total_tokens": 135,
             "prompt_tokens_details": {"cached_tokens": 6}, "completion_tokens_details": {"reasoning_tokens": 94}},
            Usage(32, 103, 6, 0, 94),
        ),
        (  # Gemini counts thoughts only in the total
            "gemini",
            {"completion_tokens": 5, "prompt_tokens": 9, "total_tokens": 212},
            Usage(9, 203, 0, 0, 198),
        ),
        ("mistral", {"prompt_tokens": 16, "completion_tokens": 34, "total_tokens": 50}, Usage(16, 34)),
        (  # Responses API
            "openai",
            {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 2},
             "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 64}, "total_tokens": 123},
            Usage(36, 87, 8, 2, 64),
        ),
        ("openai", {"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0)),  # embeddings
        ("anthropic", {"input_tokens": None, "output_tokens": "x"}, Usage()),  # junk counts as nothing
    ],
)
def test_normalize_each_provider(provider: str, raw: dict, expected: Usage) -> None:
    assert normalize(provider, raw) == expected


def test_large_body_reads_usage_from_the_tail() -> None:
    body = json.dumps({"object": "list", "data": [{"embedding": [0.001] * 80_000}], "model": "text-embedding-3-small",
                       "usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode()
    assert len(body) > 256 * 1024
    assert from_body("openai", body) == ("text-embedding-3-small", Usage(8, 0))


def test_estimate_keeps_what_the_provider_reported() -> None:
    assert estimate(40, 10) == Usage(10, 3)
    assert estimate(40, 10, known=Usage(377, 1)) == Usage(377, 3)


# Streams recorded from the mock upstream, as each provider sends them.
CASES = [
    ("anthropic", "messages", "anthropic", {"model": "claude-sonnet-4-20250514", "max_tokens": 50}),
    ("openai", "chat/completions", "chat", {"model": "o3-mini", "stream_options": {"include_usage": True}}),
    ("grok", "chat/completions", "chat", {"model": "grok-3-mini", "stream_options": {"include_usage": True}}),
    ("gemini", "chat/completions", "chat", {"model": "gemini-2.5-flash"}),
    ("mistral", "chat/completions", "chat", {"model": "mistral-small-latest"}),
    ("openai", "responses", "responses", {"model": "gpt-4.1"}),
]


@pytest.fixture(scope="module")
def recorded() -> dict[str, bytes]:
    upstream = MockProvider()
    upstream.start()
    streams = {}
    try:
        for provider, endpoint, _, extra in CASES:
            body = {**extra, "stream": True}
            if endpoint == "responses":
                body["input"] = "what does caching cost here"
            else:
                body["messages"] = [{"role": "user", "content": "what does caching cost here"}]
            response = httpx.post(f"{upstream.base_url(provider)}/{endpoint}", json=body)
            streams[provider + endpoint] = response.content
            streams[provider + endpoint + ":expected"] = json.dumps(expected_usage(provider, endpoint, body)).encode()
    finally:
        upstream.stop()
    return streams


def meter(provider: str, api: str, chunks: list[bytes], hide: bool = False) -> tuple[StreamUsage, bytes]:
    usage = StreamUsage(provider, "messages" if api == "anthropic" else api)
    tap = StreamTap(usage, hide, lambda: None)
    out = b""
    for chunk in [*chunks, b""]:
        result = tap(chunk)
        out += result if isinstance(result, bytes) else b"".join(result)
    return usage, out


@pytest.mark.parametrize(("provider", "endpoint", "api", "extra"), CASES)
def test_stream_meters_exactly_the_providers_usage(recorded, provider, endpoint, api, extra) -> None:
    stream = recorded[provider + endpoint]
    usage, forwarded = meter(provider, api, [stream])
    assert forwarded == stream
    assert usage.final
    assert usage.usage == normalize(provider, json.loads(recorded[provider + endpoint + ":expected"]))


@pytest.mark.parametrize(("provider", "endpoint", "api", "extra"), CASES)
def test_stream_split_at_every_byte_boundary_meters_the_same(recorded, provider, endpoint, api, extra) -> None:
    stream = recorded[provider + endpoint]
    whole, _ = meter(provider, api, [stream])
    for cut in range(1, len(stream)):
        usage, forwarded = meter(provider, api, [stream[:cut], stream[cut:]])
        assert (usage.usage, usage.model, usage.completion_chars) == (whole.usage, whole.model, whole.completion_chars)
        assert forwarded == stream


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_stream_split_anywhere_meters_the_same(recorded, data) -> None:
    provider, endpoint, api, _ = data.draw(st.sampled_from(CASES))
    stream = recorded[provider + endpoint]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=30))))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole, _ = meter(provider, api, [stream])
    for hide in (False, True):
        usage, _ = meter(provider, api, chunks, hide)
        assert usage.usage == whole.usage and usage.model == whole.model


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(1, 5000), max_size=20))
def test_hidden_usage_chunk_is_the_only_thing_removed(recorded, cuts) -> None:
    stream = recorded["openaichat/completions"]
    points = sorted({c % len(stream) for c in cuts} - {0})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    usage, forwarded = meter("openai", "chat", chunks, hide=True)
    decoder = SSEDecoder()
    events = decoder.feed(stream)
    expected = b"".join(e.raw for e in events if not (e.data and '"choices":[]' in e.data.replace(" ", "")))
    assert forwarded == expected
    assert usage.final and usage.usage is not None and usage.usage.input_tokens > 0


def test_reply_nested_too_deep_for_the_parser_still_yields_model_and_usage() -> None:
    body = b'{"model": "gpt-4o", "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "x": ' + (
        b"[" * 5000 + b"]" * 5000 + b"}")
    assert from_body("openai", body) == ("gpt-4o", Usage(input_tokens=3, output_tokens=2))


def test_stream_event_nested_too_deep_is_skipped() -> None:
    meter = StreamUsage("openai", "chat")
    assert meter.feed(Event(b"", None, "[" * 5000 + "]" * 5000)) is False
    assert meter.usage is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (  # Gemini native: prompt includes cached content; thoughts and tool-use prompts are outside their siblings
            {"promptTokenCount": 15, "candidatesTokenCount": 6, "thoughtsTokenCount": 190,
             "cachedContentTokenCount": 8, "toolUsePromptTokenCount": 4, "totalTokenCount": 215},
            Usage(19, 196, 8, 0, 190),
        ),
        ({"promptTokenCount": 5, "totalTokenCount": 5}, Usage(5, 0)),  # candidatesTokenCount missing
    ],
)
def test_gemini_usage_metadata_in_metrions_terms(raw: dict, expected: Usage) -> None:
    assert normalize("gemini", raw) == expected
    assert from_body("gemini", json.dumps({"usageMetadata": raw, "modelVersion": "gemini-2.5-pro"}).encode()) == (
        "gemini-2.5-pro", expected)


COMPACTION = {"input_tokens": 682, "output_tokens": 1320, "cache_read_input_tokens": 0,
              "cache_creation_input_tokens": 0,
              "iterations": [{"type": "compaction", "input_tokens": 60385, "output_tokens": 592,
                              "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
                             {"type": "message", "input_tokens": 682, "output_tokens": 1320,
                              "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50}]}


def test_anthropic_multi_step_usage_is_the_sum_of_its_iterations() -> None:
    # Anthropic: the top level leaves compaction steps out; the bill is the sum over every entry of iterations.
    assert normalize("anthropic", COMPACTION) == Usage(60385 + 682 + 150, 592 + 1320, 100, 50)
    assert normalize("anthropic", {**COMPACTION, "iterations": []}) == Usage(682, 1320)


def test_anthropic_stream_takes_the_last_iterations_list_not_a_sum_of_them() -> None:
    usage = StreamUsage("anthropic", "messages")
    start = {"type": "message_start", "message": {"model": "claude-sonnet-4-5", "usage": {
        "input_tokens": 682, "output_tokens": 1, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}}
    delta = {"type": "message_delta", "usage": {"output_tokens": 1320, "iterations": COMPACTION["iterations"]}}
    decoder = SSEDecoder()
    for payload in (start, delta, delta, {"type": "message_stop"}):
        for event in decoder.feed(b"data: " + json.dumps(payload).encode() + b"\n\n"):
            usage.feed(event)
    assert usage.usage == normalize("anthropic", COMPACTION) and usage.complete


def gemini_stream(shape: str) -> bytes:
    """A native Gemini stream as the mock writes it: SSE (CRLF) or the pretty-printed JSON array."""
    from metrion_addon.mock_provider import Scenario, _gemini_chunks

    body = {"contents": [{"role": "user", "parts": [{"text": "how are you 😀 today"}]}]}
    chunks = _gemini_chunks("gemini-2.5-flash", body, Scenario.parse(None))
    if shape == "sse":
        return b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\r\n\r\n" for c in chunks)
    return ("[" + ",\r\n".join(json.dumps(c, ensure_ascii=False, indent=2) for c in chunks) + "]").encode()


def gemini_meter(shape: str, chunks: list[bytes]) -> tuple[tuple, bytes]:
    from metrion_addon.metering import Exchange, stream_tap
    from metrion_addon.routes import Route

    query = "?alt=sse" if shape == "sse" else ""
    route = Route("gemini", "v1beta/models/gemini-2.5-flash:streamGenerateContent", f"u{query}")
    exchange = Exchange(route, "/p", "POST", started=0.0)
    tap = stream_tap(exchange, 200, "text/event-stream" if shape == "sse" else "application/json", lambda: None)
    assert tap is not None and exchange.stream is not None
    out = b""
    for chunk in [*chunks, b""]:
        result = tap(chunk)
        out += result if isinstance(result, bytes) else b"".join(result)
    meter = exchange.stream
    return (meter.usage, meter.model, meter.completion_chars, meter.final, meter.complete), out


@pytest.mark.parametrize("shape", ["sse", "array"])
def test_gemini_native_stream_split_at_every_byte_boundary_meters_the_same(shape: str) -> None:
    stream = gemini_stream(shape)
    whole, forwarded = gemini_meter(shape, [stream])
    assert forwarded == stream
    from metrion_addon.mock_provider import gemini_usage

    body = {"contents": [{"role": "user", "parts": [{"text": "how are you 😀 today"}]}]}
    reply = "Echo: how are you 😀 today 😀"
    assert whole == (normalize("gemini", gemini_usage("gemini-2.5-flash", body)), "gemini-2.5-flash", len(reply),
                     True, True)
    for cut in range(1, len(stream)):
        assert gemini_meter(shape, [stream[:cut], stream[cut:]]) == (whole, stream)


@settings(max_examples=60, deadline=None)
@given(shape=st.sampled_from(["sse", "array"]), cuts=st.lists(st.integers(1, 10_000), max_size=40))
def test_gemini_native_stream_split_anywhere_meters_the_same(shape: str, cuts: list[int]) -> None:
    stream = gemini_stream(shape)
    points = sorted({c % len(stream) for c in cuts} - {0})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert gemini_meter(shape, chunks) == gemini_meter(shape, [stream])
