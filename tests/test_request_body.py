"""Request bodies are checked for what the provider needs, and touched only to ask for stream usage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metrion_addon.config import Config
from metrion_addon.errors import MetrionError
from metrion_addon.request_body import inspect_body, needs_stream_usage, prompt_chars, with_stream_usage
from metrion_addon.routes import Route

CHAT = Route("openai", "chat/completions", "u")
MESSAGES = Route("anthropic", "messages", "u")
MODELS = Route("openai", "models", "u")


@pytest.mark.parametrize(
    ("route", "method", "body", "code"),
    [
        (CHAT, "POST", b"{", "invalid_request_body"),
        (CHAT, "POST", b"", "invalid_request_body"),
        (CHAT, "POST", b"\xff", "invalid_request_body"),
        (CHAT, "POST", b"[]", "invalid_request_body"),
        (CHAT, "POST", b'{"model": "gpt-4o"}', "missing_field"),
        (MESSAGES, "POST", b'{"model": "c", "messages": []}', "missing_field"),
        (MESSAGES, "POST", b'{"model": "c", "max_tokens": 5}', "missing_field"),
        (CHAT, "POST", b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_request_body"),
        (MODELS, "POST", b"[" * 5000 + b"]" * 5000, "invalid_request_body"),
    ],
)
def test_unusable_bodies_are_refused(route: Route, method: str, body: bytes, code: str) -> None:
    with pytest.raises(MetrionError) as caught:
        inspect_body(route, method, "application/json", body)
    assert (caught.value.status, caught.value.code) == (400, code)


def test_usable_bodies_tell_model_and_stream() -> None:
    request = inspect_body(CHAT, "POST", "application/json", b'{"model": "gpt-4o", "messages": [], "stream": true}')
    assert (request.model, request.stream) == ("gpt-4o", True)
    assert inspect_body(MODELS, "GET", "", b"").model is None
    upload = inspect_body(Route("openai", "audio/transcriptions", "u"), "POST", "multipart/form-data", b"--x\r\n")
    assert upload.parsed is None


@pytest.mark.parametrize(
    ("provider", "body", "needed"),
    [
        ("openai", {"stream": True}, True),
        ("grok", {"stream": True, "stream_options": {"include_usage": False}}, True),
        ("openai", {"stream": True, "stream_options": {"include_usage": True}}, False),
        ("openai", {"stream": False}, False),
        ("mistral", {"stream": True}, False),  # Mistral rejects stream_options
        ("gemini", {"stream": True}, False),  # Gemini sends usage anyway
    ],
)
def test_stream_usage_is_requested_only_where_needed(provider: str, body: dict, needed: bool) -> None:
    route = Route(provider, "chat/completions", "u")
    raw = json.dumps({"model": "m", "messages": [], **body}).encode()
    accepts = load_config_defaults().providers[provider].include_usage
    assert needs_stream_usage(route, inspect_body(route, "POST", "application/json", raw), accepts) is needed


def load_config_defaults() -> Config:
    raw = {"path": Path("x"), "database": Path("x.db")}
    return Config.model_validate(raw, context={"environ": {}, "need_keys": False})


def test_stream_usage_is_added_without_rewriting_the_body() -> None:
    body = b'  {"model":"m",  "messages":[],"stream":true}'
    changed = with_stream_usage(body, json.loads(body))
    assert changed.endswith(body[3:]) and json.loads(changed)["stream_options"] == {"include_usage": True}
    merged = with_stream_usage(b'{"stream_options":{"x":1}}', {"stream_options": {"x": 1}})
    assert json.loads(merged)["stream_options"] == {"x": 1, "include_usage": True}


def test_prompt_chars_count_message_text() -> None:
    body = {"system": "abc", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    assert prompt_chars(body) == len("abc") + len("hello")
