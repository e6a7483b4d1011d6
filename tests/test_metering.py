"""A request's row: usage source by endpoint and outcome, both model names, and when a disconnect is an error."""

from __future__ import annotations

import json

import pytest

from metrion_addon.metering import CLIENT_DISCONNECTED, Exchange, build_record, disconnect_error, stream_tap
from metrion_addon.request_body import RequestBody
from metrion_addon.routes import Route

CHAT = Route("openai", "chat/completions", "https://api.openai.com/v1/chat/completions")
GEMINI_ARRAY = Route("gemini", "v1beta/models/gemini-2.5-flash:streamGenerateContent",
                     "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent")
PROMPT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 40}]}


def exchange(route: Route = CHAT, parsed: dict | None = PROMPT) -> Exchange:
    request = RequestBody(parsed.get("model") if parsed else None, False, parsed)
    return Exchange(route, "/api/proxy/openai/v1/chat/completions", "POST", started=0.0, request=request)


def record(ex: Exchange, status: int | None, body: bytes | None):
    return build_record(ex, status=status, body=body, latency_ms=1.0, ttfb_ms=1.0, error=None)


@pytest.mark.parametrize(
    ("route", "status", "body", "source"),
    [
        (CHAT, 200, b'{"choices":[{"message":{"content":"hello there"}}]}', "estimated"),
        (CHAT, 200, b"", "estimated"),  # a generative call that answered nothing we could read
        (CHAT, 200, b'{"usage":{"prompt_tokens":3,"completion_tokens":2}}', "provider"),
        (CHAT, 429, b'{"error":{"message":"slow down"}}', "none"),  # refused: nothing was generated
        (Route("openai", "models", "u"), 200, b'{"data":[]}', "none"),  # no usage on this endpoint
        (Route("gemini", "v1beta/models/gemini-2.5-flash:countTokens", "u"), 200, b'{"totalTokens":5}', "none"),
    ],
)
def test_usage_source_follows_the_endpoint_and_the_outcome(route: Route, status: int, body: bytes, source: str):
    assert record(exchange(route), status, body).usage_source == source


def test_stream_that_ended_without_usage_or_text_is_estimated_from_the_prompt() -> None:
    ex = exchange()
    tap = stream_tap(ex, 200, "text/event-stream", lambda: None)
    assert tap is not None
    tap(b"data: [DONE]\n\n")
    row = record(ex, 200, None)
    assert (row.usage_source, row.input_tokens, row.output_tokens) == ("estimated", 10, 0)


def test_row_keeps_the_model_asked_for_beside_the_model_answered() -> None:
    row = record(exchange(), 200, b'{"model":"gpt-4o-2024-08-06","usage":{"prompt_tokens":1}}')
    assert (row.model, row.requested_model) == ("gpt-4o-2024-08-06", "gpt-4o")
    failed = record(exchange(), 500, b'{"error":{"message":"boom"}}')
    assert (failed.model, failed.requested_model) == ("gpt-4o", "gpt-4o")
    native = record(exchange(GEMINI_ARRAY, {"contents": []}), 200, None)
    assert native.requested_model == "gemini-2.5-flash"  # Gemini's native API names the model in the path


@pytest.mark.parametrize(
    ("route", "events", "complete"),
    [
        (CHAT, [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'], False),
        (CHAT, [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"], True),
        (Route("anthropic", "messages", "u"), [b'event: message_delta\ndata: {"type":"message_delta","usage":'
                                               b'{"output_tokens":3}}\n\n'], False),
        (Route("anthropic", "messages", "u"), [b'event: message_stop\ndata: {"type":"message_stop"}\n\n'], True),
        (Route("openai", "responses", "u"), [b'event: response.completed\ndata: {"type":"response.completed",'
                                             b'"response":{"usage":{"input_tokens":1,"output_tokens":2}}}\n\n'], True),
        (Route("gemini", "v1beta/models/m:streamGenerateContent", "u?alt=sse"),
         [b'data: {"candidates":[{"content":{"parts":[{"text":"a"}]}}]}\r\n\r\n'], False),
        (Route("gemini", "v1beta/models/m:streamGenerateContent", "u?alt=sse"),
         [b'data: {"candidates":[{"content":{"parts":[{"text":"a"}]},"finishReason":"STOP"}]}\r\n\r\n'], True),
    ],
)
def test_disconnect_is_an_error_only_before_the_terminal_event(route: Route, events: list[bytes], complete: bool):
    ex = exchange(route)
    tap = stream_tap(ex, 200, "text/event-stream", lambda: None)
    assert tap is not None
    for event in events:
        tap(event)
    assert disconnect_error(ex) == (None if complete else CLIENT_DISCONNECTED)


def test_gemini_json_array_is_tapped_and_complete_at_its_closing_bracket() -> None:
    ex = exchange(GEMINI_ARRAY, {"contents": [{"parts": [{"text": "hi"}]}]})
    tap = stream_tap(ex, 200, "application/json; charset=UTF-8", lambda: None)
    assert tap is not None
    chunk = {"candidates": [{"content": {"parts": [{"text": "Hello"}]}}], "modelVersion": "gemini-2.5-flash",
             "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 1, "totalTokenCount": 5}}
    body = b"[" + json.dumps(chunk).encode()
    assert tap(body) == body  # forwarded untouched
    assert disconnect_error(ex) == CLIENT_DISCONNECTED
    tap(b"\n]")
    assert disconnect_error(ex) is None
    assert stream_tap(exchange(GEMINI_ARRAY), 400, "application/json", lambda: None) is None  # errors: plain JSON




def test_an_error_row_is_scrubbed_of_the_clients_credentials_and_of_the_key_metrion_sent() -> None:
    ex = exchange()
    client_key, stored_key = "sk-client-0123456789", "sk-stored-0123456789-longer"
    ex.secret_sources = (({"authorization": f"Bearer {client_key}"}, "/p?key=query-key-0123"),
                         ({"authorization": f"Bearer {stored_key}"}, ""))
    assert ex.secrets() == (stored_key, client_key, "query-key-0123")  # longest first: no secret left half-scrubbed
    error = f"provider: bad keys {client_key}, {stored_key} and query-key-0123"
    row = build_record(ex, status=401, body=None, latency_ms=1.0, ttfb_ms=1.0, error=error)
    assert row.error == "provider: bad keys [redacted], [redacted] and [redacted]"
