"""A faithful local mock of the Anthropic, OpenAI, Gemini, Mistral and xAI APIs, for tests and the offline demo.

Deterministic replies, usage and SSE streams, plus failure scenarios chosen by `x-mock-scenario` (comma-separated,
`name:arg`): error-<status>, echo-key, reset, slow-headers:s, gate:key, stall-after:n, cut-after:n, delay-events:ms,
lockstep:key, no-usage, gzip, and hostile replies: deep-reply:depth, invalid-utf8, surrogate-model, surrogate-text,
huge-usage, sse-garbage:seed, trickle:ms.
Gemini's native API under `/gemini/v1beta/models/...`; recorded replies served byte for byte (`replay()` +
`x-mock-replay`).
Run it alone with `python -m metrion_addon.mock_provider [--port 9000]`.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import re
import signal
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

JSON = dict[str, Any]

PREFIXES: dict[str, str] = {
    "anthropic": "/anthropic/v1",
    "openai": "/openai/v1",
    "gemini": "/gemini/v1beta/openai",
    "mistral": "/mistral/v1",
    "grok": "/grok/v1",
    "groq": "/groq/openai/v1",  # an OpenAI-compatible provider beyond the five, as a `providers:` entry adds one
}

ENDPOINTS: dict[str, dict[str, str]] = {
    "anthropic": {"messages": "POST", "messages/count_tokens": "POST", "models": "GET"},
    "openai": {"chat/completions": "POST", "responses": "POST", "embeddings": "POST", "models": "GET"},
    "gemini": {"chat/completions": "POST", "embeddings": "POST"},
    "mistral": {"chat/completions": "POST", "embeddings": "POST"},
    "grok": {"chat/completions": "POST", "responses": "POST"},
    "groq": {"chat/completions": "POST", "models": "GET"},
}

OPENAI_SNAPSHOTS = {"gpt-4o": "gpt-4o-2024-08-06"}
GEMINI_NATIVE = re.compile(r"/gemini/(?:v1beta|v1alpha|v1)/models/([^/:]+):(\w+)$")
GEMINI_NATIVE_METHODS = ("generateContent", "streamGenerateContent", "countTokens", "embedContent",
                         "batchEmbedContents")
EMOJI = "😀"
STALL_SECONDS = 3600.0


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    id: str


# --------------------------------------------------------------------------- deterministic content


def _text_of(content: Any) -> str:
    """Text of a message `content`: a string, or a list of parts carrying a `text` key."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _last_user_text(items: list[Any]) -> str:
    users = [m for m in items if isinstance(m, dict) and m.get("role", "user") == "user"]
    return _text_of(users[-1].get("content")) if users else ""


def _gemini_contents(body: JSON) -> list[Any]:
    contents = body.get("contents")
    return contents if isinstance(contents, list) else []


def _gemini_text(content: Any) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    return _text_of(parts) if isinstance(parts, list) else ""


def reply_text(body: JSON) -> str:
    """The assistant text the mock answers with (chat, Anthropic messages, Responses and Gemini's native API)."""
    if "contents" in body:
        users = [c for c in _gemini_contents(body) if isinstance(c, dict) and c.get("role", "user") == "user"]
        return f"Echo: {_gemini_text(users[-1]) if users else ''} {EMOJI}"
    if isinstance(body.get("messages"), list):
        text = _last_user_text(body["messages"])
    else:
        inp = body.get("input")
        text = inp if isinstance(inp, str) else _last_user_text(inp) if isinstance(inp, list) else ""
    return f"Echo: {text} {EMOJI}"


def _prompt_texts(body: JSON) -> list[str]:
    """All texts counted as prompt: messages (all roles), system, Responses input/instructions."""
    texts = [_text_of(body.get("system")), _text_of(body.get("instructions"))]
    texts += [_gemini_text(content) for content in _gemini_contents(body)]
    for key in ("messages", "input"):
        value = body.get(key)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    texts.append(item)
                elif isinstance(item, dict):
                    texts.append(_text_of(item.get("content")))
    return texts


def prompt_words(body: JSON) -> int:
    return sum(len(t.split()) for t in _prompt_texts(body))


def prompt_tokens(body: JSON) -> int:
    return prompt_words(body) + 3


def output_tokens(reply: str) -> int:
    return len(reply) // 4 + 1


def response_model(provider: str, model: str) -> str:
    """The model id the mock echoes back (OpenAI returns dated snapshots)."""
    return OPENAI_SNAPSHOTS.get(model, model) if provider == "openai" else model


def _has_cache_control(body: JSON) -> bool:
    system = body.get("system")
    return isinstance(system, list) and any(isinstance(b, dict) and "cache_control" in b for b in system)


def openai_cached_tokens(body: JSON, prompt: int) -> int:
    """OpenAI's prompt cache as the demo sees it: a request naming a `prompt_cache_key` with a prompt of at least
    1,024 tokens reads three quarters of it from the cache, in the 128-token steps OpenAI reports."""
    if not body.get("prompt_cache_key") or prompt < 1024:
        return 0
    return prompt * 3 // 4 // 128 * 128


def _reasoning_tokens(provider: str, model: str) -> int:
    if provider == "openai" and model.startswith("o"):
        return 64
    if provider == "grok" and model.startswith("grok-3-mini"):
        return 94
    return 0


def _normalise_endpoint(endpoint: str) -> str:
    endpoint = endpoint.strip("/")
    return {"chat": "chat/completions", "count_tokens": "messages/count_tokens"}.get(endpoint, endpoint)


def _chat_usage(provider: str, body: JSON, prompt: int, completion: int) -> JSON:
    model = str(body.get("model", ""))
    if provider == "anthropic":
        raise ValueError("anthropic has no chat/completions")
    if provider == "mistral":
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
    if provider == "gemini":
        thoughts = 100 if model.startswith("gemini-2.5-") else 0
        return {
            "completion_tokens": completion,
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion + thoughts,
        }
    reasoning = _reasoning_tokens(provider, model)
    if provider == "grok":
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion + reasoning,
            "prompt_tokens_details": {"text_tokens": prompt, "image_tokens": 0, "cached_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
            "num_sources_used": 0,
        }
    completion += reasoning
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": openai_cached_tokens(body, prompt) or (32 if prompt_words(body) > 50 else 0),
            "audio_tokens": 0,
        },
        "completion_tokens_details": {"reasoning_tokens": reasoning, "rejected_prediction_tokens": 0},
    }


def expected_usage(provider: str, endpoint: str, body: JSON) -> JSON:
    """The provider's own usage object exactly as the mock sends it (final value when streaming).

    `endpoint` is the path below the base URL: "messages", "messages/count_tokens",
    "chat/completions", "responses" or "embeddings" ("chat" and "count_tokens" are accepted too).
    """
    endpoint = _normalise_endpoint(endpoint)
    prompt = prompt_tokens(body)
    completion = output_tokens(reply_text(body))
    if endpoint == "messages":
        cached = _has_cache_control(body)
        return {
            "input_tokens": prompt,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 1024 if cached else 0,
            "output_tokens": completion,
            "service_tier": "standard",
        }
    if endpoint == "messages/count_tokens":
        return {"input_tokens": prompt}
    if endpoint == "embeddings":
        n = sum(len(t.split()) for t in _embedding_inputs(body)) + 3
        return {"prompt_tokens": n, "total_tokens": n}
    if endpoint == "responses":
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": openai_cached_tokens(body, prompt)},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    if endpoint == "chat/completions":
        return _chat_usage(provider, body, prompt, completion)
    raise ValueError(f"no usage for {provider} {endpoint}")


def gemini_usage(model: str, body: JSON, so_far: str | None = None) -> JSON:
    """Gemini's native `usageMetadata` as the mock sends it; `so_far` is the reply text streamed until now."""
    reply = reply_text(body)
    prompt = prompt_tokens(body)
    candidates = output_tokens(reply if so_far is None else so_far)
    thoughts = 100 if model.startswith("gemini-2.5-") else 0
    usage: JSON = {"promptTokenCount": prompt, "candidatesTokenCount": candidates,
                   "totalTokenCount": prompt + candidates + thoughts,
                   "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def compaction_iterations(usage: JSON) -> list[JSON]:
    """Anthropic's `usage.iterations` for a request that compacted its context first (top level = last step)."""
    compaction = {"type": "compaction", "input_tokens": 60385, "output_tokens": 592,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    message = {"type": "message", **{key: usage[key] for key in (
        "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}}
    return [compaction, message]


def _embedding_inputs(body: JSON) -> list[str]:
    inp = body.get("input")
    if isinstance(inp, str):
        return [inp]
    if isinstance(inp, list):
        return [x if isinstance(x, str) else json.dumps(x) for x in inp]
    return []


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((b - 128) / 128, 6) for b in digest[:8]]


def _pieces(text: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(text) // n))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _rand_id(prefix: str, n: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:n]


def _dumps(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate echoed from the request: escaped, as real APIs do
        return json.dumps(obj, separators=(",", ":")).encode()


def _inflate_usage(obj: Any) -> Any:
    """`huge-usage`: every count in a `usage` object becomes 10**30 (more than any 64-bit column holds)."""
    if isinstance(obj, dict):
        return {k: (_inflate_usage_counts(v) if k == "usage" else _inflate_usage(v)) for k, v in obj.items()}
    return obj


def _inflate_usage_counts(usage: Any) -> Any:
    if isinstance(usage, dict):
        return {k: _inflate_usage_counts(v) for k, v in usage.items()}
    return 10**30 if isinstance(usage, int) and not isinstance(usage, bool) else usage


# --------------------------------------------------------------------------- errors

_ERRORS: dict[int, tuple[str, str, str, str]] = {
    # status: (anthropic type, openai type/code, google status, message)
    400: ("invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT", "Invalid request."),
    422: ("invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT", "Unprocessable request."),
    401: ("authentication_error", "invalid_api_key", "UNAUTHENTICATED", "Incorrect API key provided."),
    429: ("rate_limit_error", "rate_limit_exceeded", "RESOURCE_EXHAUSTED", "Rate limit exceeded."),
    500: ("api_error", "server_error", "INTERNAL", "Internal server error."),
}


def error_body(provider: str, status: int, message: str | None = None) -> Any:
    """The provider's own error body for `status` (400, 422, 429 or 500)."""
    a_type, o_type, g_status, default = _ERRORS.get(status, _ERRORS[500])
    msg = message or default
    if provider == "anthropic":
        return {"type": "error", "error": {"type": a_type, "message": msg}, "request_id": _rand_id("req_011")}
    if provider == "gemini":
        return [{"error": {"code": status, "message": msg, "status": g_status}}]
    if provider == "mistral":
        m_type = {429: "rate_limited", 500: "internal_server_error"}.get(status, "invalid_request_error")
        code = "1300" if status == 429 else None
        return {"object": "error", "message": msg, "type": m_type, "param": None, "code": code}
    if provider == "grok":
        code = {
            400: "Client specified an invalid argument",
            429: "Some resource has been exhausted",
            500: "Internal error",
        }.get(status, "Client specified an invalid argument")
        return {"code": code, "error": msg}
    if status == 429:
        return {"error": {"message": msg, "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
    code = None if status == 500 else "invalid_request"
    return {"error": {"message": msg, "type": o_type, "param": None, "code": code}}


MISTRAL_STREAM_OPTIONS_422: JSON = {
    "object": "error",
    "message": {
        "detail": [
            {
                "type": "extra_forbidden",
                "loc": ["body", "stream_options", "include_usage"],
                "msg": "Extra inputs are not permitted",
                "input": True,
            }
        ]
    },
    "type": "invalid_request_error",
    "param": None,
    "code": None,
}


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    names: frozenset[str]
    args: dict[str, str]

    @classmethod
    def parse(cls, header: str | None) -> Scenario:
        names: set[str] = set()
        args: dict[str, str] = {}
        for part in (header or "").split(","):
            name, _, arg = part.strip().partition(":")
            if name:
                names.add(name)
                args[name] = arg
        return cls(frozenset(names), args)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def number(self, name: str) -> float | None:
        return float(self.args[name]) if name in self.names else None


# --------------------------------------------------------------------------- SSE streams

Event = bytes  # one complete SSE event; comments start with b":"


def _sse(data: Any, event: str | None = None, crlf: bool = False) -> Event:
    payload = data if isinstance(data, bytes) else _dumps(data)
    text = (b"event: " + event.encode() + b"\n" if event else b"") + b"data: " + payload + b"\n\n"
    return text.replace(b"\n", b"\r\n") if crlf else text


KEEP_ALIVE: Event = b": keep-alive\n\n"


def _anthropic_stream(body: JSON, model: str, scenario: Scenario) -> list[Event]:
    reply = reply_text(body)
    usage = expected_usage("anthropic", "messages", body)
    start_usage = {**usage, "output_tokens": 1}
    message = {
        "id": _rand_id("msg_01"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    events = [_sse({"type": "message_start", "message": message}, "message_start")]
    if "in-stream-error" in scenario:
        err = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return [*events, _sse(err, "error")]
    events.append(
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        )
    )
    events.append(_sse({"type": "ping"}, "ping"))
    for piece in _pieces(reply):
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        events.append(_sse(delta, "content_block_delta"))
    events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    delta_msg: JSON = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if "no-usage" not in scenario:
        final: JSON = {"output_tokens": usage["output_tokens"]}
        if "iterations" in scenario:
            final["iterations"] = compaction_iterations(usage)
        if body.get("tools"):
            final = {
                k: usage[k]
                for k in (
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                    "output_tokens",
                )
            }
        delta_msg["usage"] = final
    events.append(_sse(delta_msg, "message_delta"))
    events.append(_sse({"type": "message_stop"}, "message_stop"))
    return events


def _chat_stream(provider: str, body: JSON, model: str, scenario: Scenario) -> list[Event]:
    reply = reply_text(body)
    usage = None if "no-usage" in scenario else expected_usage(provider, "chat/completions", body)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and usage is not None
    crlf = provider == "gemini"
    created = int(time.time())
    base: JSON
    if provider == "gemini":
        base = {"created": created, "id": _gemini_id(), "model": model, "object": "chat.completion.chunk"}
    elif provider == "mistral":
        base = {"id": uuid.uuid4().hex, "object": "chat.completion.chunk", "created": created, "model": model}
    else:
        cid = str(uuid.uuid4()) if provider == "grok" else _rand_id("chatcmpl-", 29)
        base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_07871e2ad8",
        }

    def chunk(delta: JSON, finish: str | None, extra: JSON | None = None) -> Event:
        choice: JSON = {"index": 0, "delta": delta}
        if provider == "gemini":
            choice = {"delta": {**delta, "role": "assistant"}, "index": 0}
            if finish:
                choice["finish_reason"] = finish
        else:
            choice.update({"finish_reason": finish, "logprobs": None})
        data: JSON = {**base, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        if extra:
            data.update(extra)
        return _sse(data, crlf=crlf)

    events: list[Event] = [KEEP_ALIVE] if provider in ("openai", "mistral") else []
    if provider != "gemini":
        first = {"role": "assistant", "content": ""}
        events.append(chunk({**first, "refusal": None} if provider != "mistral" else first, None))
    so_far = ""
    for piece in _pieces(reply):
        so_far += piece
        extra = None
        if provider == "gemini" and usage is not None:
            extra = {
                "usage": expected_usage_partial(usage, output_tokens(so_far) if so_far != reply else None)
            }
        events.append(chunk({"content": piece}, None, extra))
    if provider == "gemini":
        events.append(chunk({}, "stop", {"usage": usage} if usage is not None else None))
    elif provider == "mistral":
        events.append(chunk({"content": ""}, "stop", {"usage": usage} if usage is not None else None))
    else:
        events.append(chunk({}, "stop"))
        if include_usage:
            events.append(_sse({**base, "choices": [], "usage": usage}))
    events.append(_sse(b"[DONE]", crlf=crlf))
    return events


def expected_usage_partial(final: JSON, completion: int | None) -> JSON:
    """Gemini cumulative usage part-way through a stream (`completion=None` means final)."""
    if completion is None:
        return final
    completion = min(completion, final["completion_tokens"])
    grow = final["completion_tokens"] - completion
    return {**final, "completion_tokens": completion, "total_tokens": final["total_tokens"] - grow}


def _responses_stream(provider: str, body: JSON, model: str, scenario: Scenario) -> list[Event]:
    reply = reply_text(body)
    done = _responses_body(provider, body, model, scenario)
    msg = done["output"][0]
    pending = {**done, "status": "in_progress", "output": [], "usage": None}
    if "no-usage" in scenario:
        pending.pop("usage")
    seq = iter(range(1_000_000))
    ids = {"item_id": msg["id"], "output_index": 0, "content_index": 0}

    def ev(kind: str, **fields: Any) -> Event:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

    events = [ev("response.created", response=pending), ev("response.in_progress", response=pending)]
    events.append(
        ev("response.output_item.added", output_index=0, item={**msg, "status": "in_progress", "content": []})
    )
    empty_part = {"type": "output_text", "text": "", "annotations": []}
    events.append(ev("response.content_part.added", **ids, part=empty_part))
    for piece in _pieces(reply):
        events.append(ev("response.output_text.delta", **ids, delta=piece, logprobs=[]))
    events.append(ev("response.output_text.done", **ids, text=reply, logprobs=[]))
    events.append(ev("response.content_part.done", **ids, part=msg["content"][0]))
    events.append(ev("response.output_item.done", output_index=0, item=msg))
    events.append(ev("response.completed", response=done))
    return events


# --------------------------------------------------------------------------- JSON bodies


def _google_error(status: int, message: str | None = None) -> JSON:
    _, _, google_status, default = _ERRORS.get(status, _ERRORS[500])
    google_status = "NOT_FOUND" if status == 404 else google_status
    return {"error": {"code": status, "message": message or default, "status": google_status}}


def _gemini_candidate(text: str, finish: str | None) -> JSON:
    candidate: JSON = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return candidate


def _gemini_chunks(model: str, body: JSON, scenario: Scenario) -> list[JSON]:
    """The chunks of a native Gemini stream: cumulative usageMetadata in each, finishReason on the last."""
    reply, response_id = reply_text(body), _gemini_id()
    pieces, chunks, so_far = _pieces(reply), [], ""
    for n, piece in enumerate(pieces):
        so_far += piece
        chunk: JSON = {"candidates": [_gemini_candidate(piece, "STOP" if n == len(pieces) - 1 else None)],
                       "modelVersion": model, "responseId": response_id}
        if "no-usage" not in scenario:
            chunk["usageMetadata"] = gemini_usage(model, body, so_far)
        chunks.append(chunk)
    return chunks


def _gemini_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _responses_body(provider: str, body: JSON, model: str, scenario: Scenario) -> JSON:
    out: JSON = {
        "id": _rand_id("resp_", 32),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "model": model,
        "output": [
            {
                "type": "message",
                "id": _rand_id("msg_", 32),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": reply_text(body), "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
    if "no-usage" not in scenario:
        out["usage"] = expected_usage(provider, "responses", body)
    return out


def _chat_body(provider: str, body: JSON, model: str, scenario: Scenario) -> JSON:
    reply = reply_text(body)
    created = int(time.time())
    out: JSON
    if provider == "gemini":
        out = {
            "choices": [
                {"finish_reason": "stop", "index": 0, "message": {"content": reply, "role": "assistant"}}
            ],
            "created": created,
            "id": _gemini_id(),
            "model": model,
            "object": "chat.completion",
        }
    elif provider == "mistral":
        out = {
            "id": _rand_id("cmpl-", 32),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply, "tool_calls": None, "prefix": False},
                    "finish_reason": "stop",
                }
            ],
        }
    elif provider == "grok":
        message: JSON = {"role": "assistant", "content": reply, "refusal": None}
        if _reasoning_tokens(provider, model):
            message["reasoning_content"] = "The user wants an echo."
        out = {
            "id": str(uuid.uuid4()),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "system_fingerprint": "fp_3a7881b4a5",
        }
    else:
        out = {
            "id": _rand_id("chatcmpl-", 29),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "service_tier": "default",
            "system_fingerprint": "fp_07871e2ad8",
        }
    if "no-usage" not in scenario:
        out["usage"] = expected_usage(provider, "chat/completions", body)
    return out


def _anthropic_body(body: JSON, model: str, scenario: Scenario) -> JSON:
    out: JSON = {
        "id": _rand_id("msg_01"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply_text(body)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }
    if "no-usage" not in scenario:
        out["usage"] = expected_usage("anthropic", "messages", body)
        if "iterations" in scenario:
            out["usage"]["iterations"] = compaction_iterations(out["usage"])
    return out


def _embeddings_body(provider: str, body: JSON, model: str, scenario: Scenario) -> JSON:
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, text in enumerate(_embedding_inputs(body)):
        vec = _embedding(text)
        emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    out: JSON = {"object": "list", "data": data, "model": model}
    if provider == "mistral":
        out = {"id": uuid.uuid4().hex, **out}
    if "no-usage" not in scenario:
        out["usage"] = expected_usage(provider, "embeddings", body)
    return out


def _models_body(provider: str) -> JSON:
    if provider == "anthropic":
        models = [
            ("claude-opus-4-1-20250805", "Claude Opus 4.1"),
            ("claude-sonnet-4-20250514", "Claude Sonnet 4"),
            ("claude-3-5-haiku-20241022", "Claude Haiku 3.5"),
        ]
        data = [
            {"type": "model", "id": m, "display_name": d, "created_at": "2025-05-22T00:00:00Z"}
            for m, d in models
        ]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    ids = ["gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"]
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 1715367049, "owned_by": "system"} for m in ids],
    }


# --------------------------------------------------------------------------- server


class MockProvider:
    """aiohttp server on 127.0.0.1, run in a background thread with its own event loop."""

    def __init__(self, port: int = 0) -> None:
        self.port: int = port
        self.received: list[Received] = []
        self.sent: dict[str, bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._locks: dict[str, asyncio.Semaphore] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self._replays: dict[str, tuple[int, dict[str, str], list[bytes]]] = {}

    # -- lifecycle

    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._setup())
            except BaseException as exc:  # surfaced to the caller of start()
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="mock-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]

    async def _setup(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = self._runner = None

    def base_url(self, provider: str) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIXES[provider]}"

    def replay(self, key: str, status: int, headers: dict[str, str], chunks: list[bytes]) -> None:
        """Answer requests sent with `x-mock-replay: <key>` with exactly these bytes, written chunk by chunk."""
        self._replays[key] = (status, headers, chunks)

    def release(self, key: str) -> None:
        """Let exactly one more event out of streams running with `lockstep:<key>`."""
        assert self._loop is not None, "mock not started"
        self._loop.call_soon_threadsafe(lambda: self._lock(key).release())

    def open_gate(self, key: str) -> None:
        """Let every request held with `gate:<key>` (and any later one) be answered."""
        assert self._loop is not None, "mock not started"
        self._loop.call_soon_threadsafe(lambda: self._gate(key).set())

    def _gate(self, key: str) -> asyncio.Event:
        return self._gates.setdefault(key, asyncio.Event())

    def _lock(self, key: str) -> asyncio.Semaphore:
        return self._locks.setdefault(key, asyncio.Semaphore(0))

    # -- request handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = await self._answer(request)
        trickle = Scenario.parse(request.headers.get("x-mock-scenario")).number("trickle")
        if trickle is None or not isinstance(response, web.Response) or not isinstance(response.body, bytes):
            return response
        return await _trickle(request, response, response.body, trickle / 1000)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        rid = str(uuid.uuid4())
        raw = await request.read()
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.received.append(Received(request.method, request.path, request.query_string, headers, raw, rid))
        scenario = Scenario.parse(request.headers.get("x-mock-scenario"))

        delay = scenario.number("slow-headers")
        if delay:
            await asyncio.sleep(delay)
        if "gate" in scenario:  # held, headers and all, until the test calls open_gate(key)
            await self._gate(scenario.args["gate"]).wait()
        if "reset" in scenario:
            self.sent[rid] = b""
            assert request.transport is not None
            request.transport.close()
            return web.Response()  # aiohttp's write fails on the closed transport and is ignored

        if replayed := self._replays.get(request.headers.get("x-mock-replay", "")):
            return await self._replay(rid, request, *replayed)
        if native := GEMINI_NATIVE.match(request.path):
            return await self._gemini_native(rid, request, scenario, native.group(1), native.group(2), raw)
        provider, endpoint = self._route(request.path)
        if provider is None:
            return self._json(rid, request, scenario, 404, {"error": "not found"})
        if ENDPOINTS[provider].get(endpoint) != request.method:
            return self._json(
                rid, request, scenario, 404, error_body(provider, 400, f"Unknown route {endpoint}")
            )

        for status in (429, 500, 400):
            if f"error-{status}" in scenario:
                return self._json(rid, request, scenario, status, error_body(provider, status), provider)
        if "echo-key" in scenario:  # like a real provider quoting the rejected key back
            key = _sent_key(request)
            message = f"Incorrect API key provided: {key}. You can find your API key in your account settings."
            return self._json(rid, request, scenario, 401, error_body(provider, 401, message), provider)

        if endpoint == "models":
            return self._json(rid, request, scenario, 200, _models_body(provider), provider)
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            msg = f"Invalid JSON body: {exc}"
            return self._json(rid, request, scenario, 400, error_body(provider, 400, msg), provider)
        if provider == "mistral" and "stream_options" in body:
            return self._json(rid, request, scenario, 422, MISTRAL_STREAM_OPTIONS_422, provider)

        model = response_model(provider, str(body.get("model", "")))
        stream = bool(body.get("stream"))
        if endpoint == "messages/count_tokens":
            return self._json(rid, request, scenario, 200, expected_usage(provider, endpoint, body), provider)
        if endpoint == "embeddings":
            return self._json(
                rid, request, scenario, 200, _embeddings_body(provider, body, model, scenario), provider
            )
        builders: dict[str, tuple[Callable[[], JSON], Callable[[], list[Event]]]] = {
            "messages": (
                lambda: _anthropic_body(body, model, scenario),
                lambda: _anthropic_stream(body, model, scenario),
            ),
            "chat/completions": (
                lambda: _chat_body(provider, body, model, scenario),
                lambda: _chat_stream(provider, body, model, scenario),
            ),
            "responses": (
                lambda: _responses_body(provider, body, model, scenario),
                lambda: _responses_stream(provider, body, model, scenario),
            ),
        }
        make_json, make_stream = builders[endpoint]
        if stream:
            return await self._stream(rid, request, scenario, make_stream(), provider)
        return self._json(rid, request, scenario, 200, make_json(), provider)

    async def _replay(
        self, rid: str, request: web.Request, status: int, headers: dict[str, str], chunks: list[bytes]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={**headers, "x-mock-id": rid})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.sent[rid] = b""
        for chunk in chunks:
            self.sent[rid] += chunk
            await resp.write(chunk)
            assert resp._payload_writer is not None
            await resp._payload_writer.drain()
        if hold := Scenario.parse(request.headers.get("x-mock-scenario")).number("hold-end"):
            await asyncio.sleep(hold)  # the body stays open after the recorded end, as a slow provider's may
        await resp.write_eof()
        return resp

    async def _gemini_native(
        self, rid: str, request: web.Request, scenario: Scenario, model: str, method: str, raw: bytes
    ) -> web.StreamResponse:
        """Gemini's native API: generateContent, streamGenerateContent (SSE or JSON array), countTokens, embeddings."""
        if method not in GEMINI_NATIVE_METHODS or request.method != "POST":
            return self._json(rid, request, scenario, 404, _google_error(404, f"Method {method} not found"))
        for status in (429, 500, 400):
            if f"error-{status}" in scenario:
                return self._json(rid, request, scenario, status, _google_error(status))
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            return self._json(rid, request, scenario, 400, _google_error(400, f"Invalid JSON payload: {exc}"))
        if method == "countTokens":
            return self._json(rid, request, scenario, 200, {"totalTokens": prompt_tokens(body),
                                                            "promptTokensDetails": []})
        if method in ("embedContent", "batchEmbedContents"):
            texts = [_gemini_text(r.get("content")) for r in body.get("requests") or () if isinstance(r, dict)]
            vectors = [{"values": _embedding(text)} for text in texts or [_gemini_text(body.get("content"))]]
            out = {"embeddings": vectors} if method == "batchEmbedContents" else {"embedding": vectors[0]}
            return self._json(rid, request, scenario, 200, out)
        chunks = _gemini_chunks(model, body, scenario)
        if method == "generateContent":
            return self._json(rid, request, scenario, 200, chunks[-1] | {"candidates": [_gemini_candidate(
                reply_text(body), "STOP")]})
        if request.query.get("alt") == "sse":
            return await self._stream(rid, request, scenario, [_sse(c, crlf=True) for c in chunks], "gemini")
        return await self._json_array(rid, request, scenario, chunks)

    async def _json_array(self, rid: str, request: web.Request, scenario: Scenario, chunks: list[JSON]
                          ) -> web.StreamResponse:
        """The default streamGenerateContent: one JSON array, written element by element (pretty-printed)."""
        resp = web.StreamResponse(status=200, headers={"x-mock-id": rid})
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.sent[rid] = b""
        cut = scenario.number("cut-after")
        for n, chunk in enumerate(chunks):
            if cut is not None and n >= cut:
                assert request.transport is not None
                request.transport.close()
                return resp
            text = ("[" if n == 0 else ",\r\n") + json.dumps(chunk, ensure_ascii=False, indent=2)
            await self._write(rid, resp, text.encode())
        if hold := scenario.number("hold-end"):
            await asyncio.sleep(hold)
        await self._write(rid, resp, b"]")
        await resp.write_eof()
        return resp

    @staticmethod
    def _route(path: str) -> tuple[str | None, str]:
        for provider, prefix in PREFIXES.items():
            if path.startswith(prefix + "/"):
                return provider, path[len(prefix) + 1 :].strip("/")
        return None, ""

    @staticmethod
    def _headers(rid: str, provider: str | None, status: int) -> dict[str, str]:
        headers = {"x-mock-id": rid}
        if provider == "anthropic":
            headers["request-id"] = _rand_id("req_011")
        elif provider in ("openai", "grok"):
            headers["x-request-id"] = _rand_id("req_", 32)
        if status == 429:
            headers["retry-after"] = "1"
        return headers

    def _json(
        self,
        rid: str,
        request: web.Request,
        scenario: Scenario,
        status: int,
        obj: Any,
        provider: str | None = None,
    ) -> web.Response:
        payload = _hostile(_dumps(_inflate_usage(obj) if "huge-usage" in scenario else obj), scenario)
        headers = self._headers(rid, provider, status)
        if "gzip" in scenario and _accepts_gzip(request.headers.get("accept-encoding", "")):
            payload = gzip.compress(payload, mtime=0)
            headers["content-encoding"] = "gzip"
        self.sent[rid] = payload
        return web.Response(status=status, body=payload, headers=headers, content_type="application/json")

    async def _stream(
        self, rid: str, request: web.Request, scenario: Scenario, events: list[Event], provider: str
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=self._headers(rid, provider, 200))
        resp.content_type = "text/event-stream"
        resp.headers["cache-control"] = "no-cache"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.sent[rid] = b""
        events = _hostile_events(events, scenario)
        stall, cut = scenario.number("stall-after"), scenario.number("cut-after")
        delay = (scenario.number("delay-events") or 0) / 1000
        lock_key = scenario.args.get("lockstep") if "lockstep" in scenario else None
        sent_events = 0
        for event in events:
            is_comment = event.startswith(b":")
            if not is_comment:
                if stall is not None and sent_events >= stall:
                    await asyncio.sleep(STALL_SECONDS)
                if cut is not None and sent_events >= cut:
                    assert request.transport is not None
                    request.transport.close()  # flushes what was written, then FIN without the last chunk
                    return resp  # aiohttp's write_eof fails on the closed transport and is ignored
                if sent_events and lock_key is not None:
                    await self._lock(lock_key).acquire()
                if sent_events and delay:
                    await asyncio.sleep(delay)
            await self._write(rid, resp, event)
            sent_events += 0 if is_comment else 1
        if hold := scenario.number("hold-end"):
            await asyncio.sleep(hold)  # the body stays open after the last event, as real providers' sometimes do
        await resp.write_eof()
        return resp

    async def _write(self, rid: str, resp: web.StreamResponse, event: bytes) -> None:
        """Write one event; a multi-byte UTF-8 character in it is split across two writes."""
        split = next((i + 1 for i, b in enumerate(event) if b >= 0xC0), None)
        parts = [event[:split], event[split:]] if split else [event]
        for n, part in enumerate(parts):
            if n:
                await asyncio.sleep(0.002)
            self.sent[rid] += part
            await resp.write(part)
            assert resp._payload_writer is not None
            await resp._payload_writer.drain()


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _hostile(payload: bytes, scenario: Scenario) -> bytes:
    """A JSON reply made hostile: nested too deep for a recursive parser, invalid UTF-8, lone surrogates."""
    if (depth := scenario.number("deep-reply")) and payload.endswith(b"}"):
        payload = payload[:-1] + b',"deep":' + _deep(int(depth)) + b"}"
    if "invalid-utf8" in scenario:
        payload = payload.replace(b'"Echo', b'"\xff\xfeEcho', 1)
    if "surrogate-model" in scenario:
        payload = payload.replace(b'"model":"', b'"model":"\\udcff', 1)
    if "surrogate-text" in scenario:  # valid JSON, but no UTF-8 can encode the string it decodes to
        payload = payload.replace(b'"Echo', b'"\\ud800Echo')
    return payload


def _hostile_events(events: list[Event], scenario: Scenario) -> list[Event]:
    """An SSE reply made hostile: a deeply nested event, invalid UTF-8, lone surrogates, or random bytes."""
    if depth := scenario.number("deep-reply"):
        events = [*events[:1], _sse(b'{"deep":' + _deep(int(depth)) + b"}"), *events[1:]]
    if "invalid-utf8" in scenario:
        events = [event.replace(b"Echo", b"\xff\xfeEcho") for event in events]
    if "surrogate-text" in scenario:
        events = [event.replace(b'"Echo', b'"\\ud800Echo') for event in events]
    if "sse-garbage" in scenario:
        seed = int(scenario.args["sse-garbage"] or 0)
        garbage = hashlib.sha256(str(seed).encode()).digest() * 8
        events = [garbage[:100], b"data: {\"no json\n\r\r\n", garbage[100:], b"\n\ndata: \xc3\n\n"]
    return events


async def _trickle(request: web.Request, template: web.Response, body: bytes, pause: float) -> web.StreamResponse:
    """Send a finished reply's body with its content-length, 16 bytes every `pause` seconds."""
    resp = web.StreamResponse(status=template.status, headers=template.headers)
    resp.content_length = len(body)
    await resp.prepare(request)
    for start in range(0, len(body), 16):
        await resp.write(body[start : start + 16])
        await asyncio.sleep(pause)
    await resp.write_eof()
    return resp


def _sent_key(request: web.Request) -> str:
    """The credential the client sent: x-api-key, x-goog-api-key, a Bearer token or a key query parameter."""
    for name in ("x-api-key", "x-goog-api-key"):
        if value := request.headers.get(name):
            return value
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value
    return request.query.get("key", "")


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.lower().split(","):
        name, _, params = item.strip().partition(";")
        if name.strip() in ("gzip", "*"):
            q = params.strip()
            return not (q.startswith("q=") and float(q[2:] or 0) == 0)
    return False


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Serve the mock providers on 127.0.0.1 until interrupted.")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    # Ctrl-C stops it even when started from a shell that ignores SIGINT (a background job): Python would inherit that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mock = MockProvider(args.port)
    mock.start()
    for provider in PREFIXES:
        print(f"{provider:10} {mock.base_url(provider)}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        mock.stop()


if __name__ == "__main__":
    main()
