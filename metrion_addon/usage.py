"""What a request used: normalise each provider's usage object, from a JSON body or an SSE stream.

Input counts all prompt tokens (cached included); output counts reasoning. Streams: last value wins, never sum.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .sse import Event

_LARGE_BODY = 256 * 1024  # above this, read usage and model from the tail instead of parsing everything


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _sub(raw: dict, outer: str, inner: str) -> int:
    details = raw.get(outer)
    return _int(details.get(inner)) if isinstance(details, dict) else 0


def _anthropic(raw: dict) -> Usage:
    """Anthropic usage; with `iterations` (compaction, server-tool loops, advisors) the bill is their sum.

    Anthropic's API reference: a `compaction` entry's tokens are not in the top-level fields, and the tokens billed
    for the request are the sum over every entry of `usage.iterations`.
    """
    steps = [step for step in raw.get("iterations") or () if isinstance(step, dict)]
    if not isinstance(raw.get("iterations"), list) or not steps:
        steps = [raw]
    cache_read = sum(_int(step.get("cache_read_input_tokens")) for step in steps)
    cache_write = sum(_int(step.get("cache_creation_input_tokens")) for step in steps)
    return Usage(
        input_tokens=sum(_int(step.get("input_tokens")) for step in steps) + cache_read + cache_write,
        output_tokens=sum(_int(step.get("output_tokens")) for step in steps),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=_sub(raw, "output_tokens_details", "thinking_tokens"),
    )


def _gemini_native(raw: dict) -> Usage:
    """Gemini's `usageMetadata`: the prompt includes cached content; thoughts and tool-use prompts are separate."""
    thoughts = _int(raw.get("thoughtsTokenCount"))
    return Usage(
        input_tokens=_int(raw.get("promptTokenCount")) + _int(raw.get("toolUsePromptTokenCount")),
        output_tokens=_int(raw.get("candidatesTokenCount")) + thoughts,
        cache_read_tokens=_int(raw.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


_GEMINI_NATIVE_KEYS = ("promptTokenCount", "candidatesTokenCount", "totalTokenCount", "thoughtsTokenCount")


def normalize(provider: str, raw: dict) -> Usage:
    """One provider usage object (Anthropic, Gemini usageMetadata, Responses-style or chat-style) in Metrion's terms."""
    if provider == "anthropic":
        return _anthropic(raw)
    if any(key in raw for key in _GEMINI_NATIVE_KEYS):
        return _gemini_native(raw)
    if "prompt_tokens" not in raw and "input_tokens" in raw:  # OpenAI Responses API
        return Usage(
            input_tokens=_int(raw.get("input_tokens")),
            output_tokens=_int(raw.get("output_tokens")),
            cache_read_tokens=_sub(raw, "input_tokens_details", "cached_tokens"),
            cache_write_tokens=_sub(raw, "input_tokens_details", "cache_write_tokens"),
            reasoning_tokens=_sub(raw, "output_tokens_details", "reasoning_tokens"),
        )
    prompt = _int(raw.get("prompt_tokens"))
    completion = _int(raw.get("completion_tokens"))
    total = _int(raw.get("total_tokens"))
    reasoning = _sub(raw, "completion_tokens_details", "reasoning_tokens")
    output = completion
    if provider == "grok" and reasoning and total == prompt + completion + reasoning:
        output = completion + reasoning  # xAI bills reasoning as output but leaves it out of completion
    elif provider == "gemini" and total > prompt + completion:
        output = total - prompt  # Gemini counts thoughts in the total only
        reasoning = reasoning or total - prompt - completion
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        cache_read_tokens=_sub(raw, "prompt_tokens_details", "cached_tokens"),
        cache_write_tokens=_sub(raw, "prompt_tokens_details", "cache_write_tokens"),
        reasoning_tokens=reasoning,
    )


def estimate(prompt_chars: int, completion_chars: int, known: Usage | None = None) -> Usage:
    """A rough count (4 characters a token) for what the provider did not report."""
    output = max(math.ceil(completion_chars / 4), known.output_tokens if known else 0)
    if known and known.input_tokens:
        return Usage(known.input_tokens, output, known.cache_read_tokens, known.cache_write_tokens)
    return Usage(input_tokens=math.ceil(prompt_chars / 4), output_tokens=output)


def _tail_value(body: bytes, key: bytes) -> object:
    at = body.rfind(b'"' + key + b'"')
    if at < 0:
        return None
    colon = body.find(b":", at)
    try:
        value, _ = json.JSONDecoder().raw_decode(body[colon + 1 :].decode("utf-8").lstrip())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value


def from_body(provider: str, body: bytes) -> tuple[str | None, Usage | None]:
    """The model and usage of a non-streamed JSON response; (None, None) if it has neither.

    Gemini's native API says `modelVersion` and `usageMetadata` where the others say `model` and `usage`.
    """
    parsed: object = None
    if len(body) <= _LARGE_BODY:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None, None
        except RecursionError:  # nested deeper than Python's parser goes: read the two values we need instead
            parsed = None
        else:
            if not isinstance(parsed, dict):
                return None, None
    if isinstance(parsed, dict):
        model = parsed.get("model") or parsed.get("modelVersion")
        raw = parsed.get("usage") or parsed.get("usageMetadata")
    else:
        model = _tail_value(body, b"model") or _tail_value(body, b"modelVersion")
        raw = _tail_value(body, b"usage") or _tail_value(body, b"usageMetadata")
    return (model if isinstance(model, str) else None), (normalize(provider, raw) if isinstance(raw, dict) else None)


class StreamUsage:
    """Follows one streamed response event by event: model, usage so far, text length, in-stream errors, and
    whether the provider's terminal event has passed (after which a client disconnect is a normal end)."""

    def __init__(self, provider: str, api: str) -> None:
        self.provider = provider
        self.api = api
        self.model: str | None = None
        self.final = False  # the provider's closing usage has been seen
        self.complete = False  # the provider's terminal event has been seen
        self.completion_chars = 0
        self.error: str | None = None
        self._raw: dict = {}

    @property
    def usage(self) -> Usage | None:
        return normalize(self.provider, self._raw) if self._raw else None

    def feed(self, event: Event) -> bool:
        """Take one SSE event; True if it is a usage-only chunk (`choices: []` with usage)."""
        if not event.data:
            return False
        if event.data.startswith("[DONE]"):
            self.complete = True
            return False
        try:
            data = json.loads(event.data)
        except (ValueError, RecursionError):
            return False
        return self.feed_object(data) if isinstance(data, dict) else False

    def feed_object(self, data: dict) -> bool:
        """Take one decoded chunk (an SSE event's JSON, or an element of Gemini's streamed array)."""
        if self.provider == "anthropic":
            self._anthropic(data)
            return False
        if self.api == "responses":
            self._responses(data)
            return False
        if self.api == "generate":
            self._gemini(data)
            return False
        return self._chat(data)

    def _anthropic(self, data: dict) -> None:
        kind = data.get("type")
        if kind == "message_start" and isinstance(message := data.get("message"), dict):
            self.model = message.get("model") or self.model
            if isinstance(usage := message.get("usage"), dict):
                self._raw = dict(usage)
        elif kind == "content_block_delta" and isinstance(delta := data.get("delta"), dict):
            for key in ("text", "thinking", "partial_json"):
                if isinstance(text := delta.get(key), str):
                    self.completion_chars += len(text)
        elif kind == "message_delta" and isinstance(usage := data.get("usage"), dict):
            self._raw.update({key: value for key, value in usage.items() if value is not None})
            self.final = True
        elif kind == "message_stop":
            self.complete = True
        elif kind == "error":
            self.error = _message(data.get("error"))

    def _responses(self, data: dict) -> None:
        kind = data.get("type", "")
        if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
            self.completion_chars += len(data["delta"])
        elif isinstance(response := data.get("response"), dict):
            self.model = response.get("model") or self.model
            if isinstance(usage := response.get("usage"), dict):
                self._raw = usage
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self.complete = True
                self.final = bool(self._raw)
        elif kind == "error":
            self.error = _message(data)

    def _chat(self, data: dict) -> bool:
        if isinstance(model := data.get("model"), str):
            self.model = model
        if "error" in data:
            self.error = _message(data["error"])
        choices = data.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            for key in ("content", "reasoning_content"):
                if isinstance(text := delta.get(key), str):
                    self.completion_chars += len(text)
            for call in delta.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(args := function.get("arguments"), str):
                    self.completion_chars += len(args)
        usage = data.get("usage")
        if not isinstance(usage, dict) and isinstance(groq := data.get("x_groq"), dict):
            usage = groq.get("usage")  # Groq's own place for stream usage when include_usage was not asked for
        if not isinstance(usage, dict):
            return False
        self._raw = usage
        self.final = True
        if self.provider == "gemini" and any(isinstance(c, dict) and c.get("finish_reason") for c in choices or ()):
            self.complete = True  # Gemini's compat stream: its closing usage rides on the finish_reason chunk
        return choices == []

    def _gemini(self, data: dict) -> None:
        if isinstance(model := data.get("modelVersion"), str):
            self.model = model
        if "error" in data:
            self.error = _message(data["error"])
        candidates = data.get("candidates")
        for candidate in candidates if isinstance(candidates, list) else ():
            if not isinstance(candidate, dict):
                continue
            content = candidate.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts if isinstance(parts, list) else ():
                if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                    self.completion_chars += len(text)
            if candidate.get("finishReason"):
                self.complete = True
        if isinstance(usage := data.get("usageMetadata"), dict):
            self._raw.update({key: value for key, value in usage.items() if value is not None})
            self.final = self.complete or self.final


def _message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    return str(error)
