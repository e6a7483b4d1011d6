"""What a request asks for: validate the JSON body (400 when unusable) and ask for stream usage where needed.

The body is forwarded byte for byte, except that OpenAI and xAI streams get `stream_options.include_usage`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import MetrionError
from .routes import Route

_REQUIRED = {"chat": ("model", "messages"), "messages": ("model", "messages", "max_tokens")}
_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


@dataclass(frozen=True)
class RequestBody:
    model: str | None
    stream: bool
    parsed: dict | None


def _bad_request(message: str, code: str = "invalid_request_body") -> MetrionError:
    return MetrionError(400, code, message)


def inspect_body(route: Route, method: str, content_type: str, body: bytes) -> RequestBody:
    """Parse and check the body for `route`; raise MetrionError(400) if the provider could not use it."""
    expects_json = route.api in _REQUIRED or (route.api != "other" and method in ("POST", "PUT", "PATCH"))
    is_json = "json" in content_type.lower() or (not content_type and body.strip()[:1] == b"{")
    if not (expects_json or (is_json and body)):
        return RequestBody(None, False, None)
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        where = f" at position {e.pos}" if isinstance(e, json.JSONDecodeError) else ""
        raise _bad_request(f"Request body is not valid JSON{where}.") from None
    except RecursionError:  # the provider's parser would refuse it too; Metrion must never forward it unread
        raise _bad_request("Request body is nested too deeply to be read as JSON.") from None
    if not isinstance(parsed, dict):
        raise _bad_request("Request body must be a JSON object.")
    missing = [name for name in _REQUIRED.get(route.api, ()) if parsed.get(name) is None]
    if missing:
        raise _bad_request(f"Request body is missing required field(s): {', '.join(missing)}.", "missing_field")
    model = parsed.get("model")
    return RequestBody(model if isinstance(model, str) else None, parsed.get("stream") is True, parsed)


def needs_stream_usage(route: Route, request: RequestBody, provider_accepts: bool) -> bool:
    """True when Metrion must ask for stream usage the client did not ask for (and hide it again).

    `provider_accepts`: the provider takes `stream_options` (OpenAI, xAI, Groq; Gemini sends usage anyway and
    Mistral rejects it).
    """
    if not provider_accepts or route.api != "chat" or not request.stream:
        return False
    options = (request.parsed or {}).get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def with_stream_usage(body: bytes, parsed: dict) -> bytes:
    """The body with `stream_options.include_usage: true`, touching as few bytes as possible."""
    if "stream_options" not in parsed:
        start = body.index(b"{") + 1
        return body[:start] + _INCLUDE_USAGE + body[start:]
    options = parsed["stream_options"] if isinstance(parsed["stream_options"], dict) else {}
    return json.dumps({**parsed, "stream_options": {**options, "include_usage": True}}).encode()


def prompt_chars(parsed: dict | None) -> int:
    """Characters of prompt text, for estimating input tokens when the provider reports none."""
    if not parsed:
        return 0
    total = 0
    stack: list[object] = [parsed.get(key) for key in ("system", "messages", "input", "prompt", "instructions",
                                                      "contents", "systemInstruction", "system_instruction")]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(value for key, value in item.items() if key in ("content", "text", "input") or
                         isinstance(value, list | dict))
    return total
