"""What Metrion does to a request's headers: a lower-cased snapshot, one-pass rewrites, credential redaction.

Works on mitmproxy's raw header fields (each `Headers` lookup scans every field), without importing mitmproxy.
"""

from __future__ import annotations

from typing import Protocol

from metrion_addon.redact import CREDENTIAL_HEADERS, redact_query

Fields = tuple[tuple[bytes, bytes], ...]

_CREDENTIAL_HEADERS = tuple(name.encode() for name in CREDENTIAL_HEADERS)
_REDACTED = b"[redacted]"


class Headers(Protocol):
    fields: Fields


class Request(Protocol):
    headers: Headers
    path: str


def lowercase(headers: Headers) -> dict[str, str]:
    """The headers as a plain dict with lower-case names (read from the raw fields: fast)."""
    return {name.decode("latin-1").lower(): value.decode("utf-8", "surrogateescape") for name, value in headers.fields}


def rewrite(headers: Headers, drop: set[str], replace: dict[str, str]) -> None:
    """Drop and replace headers in one pass over the raw fields (`drop` and `replace` in lower case)."""
    gone = {name.encode() for name in (*drop, *replace)}
    kept = tuple(field for field in headers.fields if field[0].lower() not in gone)
    headers.fields = kept + tuple((name.encode(), value.encode()) for name, value in replace.items())


def drop_metrion_headers(headers: Headers) -> None:
    """Remove every x-metrion-* header (they are for Metrion, never for a provider)."""
    rewrite(headers, {name.decode("latin-1").lower() for name, _ in headers.fields
                      if name.lower().startswith(b"x-metrion-")}, {})


def redact(headers: Headers) -> None:
    """Keep secrets out of mitmweb, saved flows and logs once they have been used (idempotent).

    The scheme of a Bearer or Basic credential stays ("Bearer [redacted]"): it says what kind was sent.
    """
    fields = headers.fields
    for i, (name, value) in enumerate(fields):
        if name.lower() in _CREDENTIAL_HEADERS and not value.endswith(_REDACTED):
            scheme, _, secret = value.partition(b" ")
            kept = scheme + b" " if secret and scheme.lower() in (b"bearer", b"basic") else b""
            fields = (*fields[:i], (name, kept + _REDACTED), *fields[i + 1 :])
    headers.fields = fields


def redact_request(request: Request) -> None:
    """Once the request is sent (or refused): no credential header or credential query parameter stays in it."""
    redact(request.headers)
    path = request.path
    if "?" in path and (redacted := redact_query(path)) != path:
        request.path = redacted
