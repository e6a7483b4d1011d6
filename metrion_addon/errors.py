"""Metrion's own error answers, shaped like the provider's so its SDK raises its usual exception.

Anthropic gets `{"type":"error","error":{...}}`, Gemini's native API `{"error":{code,message,status}}`, the
OpenAI-style providers `{"error":{message,type,param,code}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    407: "authentication_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    407: "authentication_error",
    429: "rate_limit_exceeded",
    502: "server_error",
    503: "server_error",
    504: "timeout",
}

_GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    407: "UNAUTHENTICATED",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@dataclass(frozen=True)
class MetrionError(Exception):
    """An answer Metrion gives instead of (or in place of) the provider's; `code` is machine-readable."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def error_body(api_format: str | None, error: MetrionError) -> bytes:
    """The error in the route's wire format (`anthropic`, `gemini`, else OpenAI's)."""
    if api_format == "anthropic":
        kind = _ANTHROPIC_TYPES.get(error.status, "api_error")
        payload: dict = {"type": "error", "error": {"type": kind, "message": error.message}}
    elif api_format == "gemini":
        status = _GOOGLE_STATUSES.get(error.status, "INTERNAL")
        payload = {"error": {"code": error.status, "message": error.message, "status": status}}
    else:
        kind = _OPENAI_TYPES.get(error.status, "server_error")
        payload = {"error": {"message": error.message, "type": kind, "param": None, "code": error.code}}
    return json.dumps(payload).encode()


def error_headers(error: MetrionError) -> dict[str, str]:
    return {"content-type": "application/json", "x-metrion-error": error.code, **error.headers}


def provider_error_message(body: bytes | None, limit: int = 300) -> str | None:
    """The message in a provider's error body, whatever its shape (Anthropic, OpenAI, Gemini, Mistral, xAI)."""
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body[:limit].decode("utf-8", "replace").strip() or None
    if isinstance(parsed, list) and parsed:  # Gemini wraps its error in a list
        parsed = parsed[0]
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error", parsed)
    if isinstance(error, str):  # xAI: {"code": ..., "error": "<message>"}
        return error[:limit]
    message = error.get("message") if isinstance(error, dict) else None
    if message is None and isinstance(error, dict):
        message = error.get("detail")
    if message is None:
        return None
    return (message if isinstance(message, str) else json.dumps(message))[:limit]
