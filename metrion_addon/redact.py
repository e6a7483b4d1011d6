"""What Metrion must never keep: credential query parameters, and credentials a provider quotes back in its errors.

Pure functions over strings; the addon applies them to the stored path, to flows, and to every stored error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote_plus

from .auth import proxy_authorization_token

REDACTED = "[redacted]"
CREDENTIAL_PARAMS = frozenset({
    "key", "api_key", "apikey", "api-key", "access_token", "token", "auth", "x-goog-api-key", "password", "secret",
    "client_secret", "signature", "sig",
})
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "x-metrion-token", "proxy-authorization")
_METRION_TOKEN = re.compile(r"sk-metrion-[0-9a-fA-F]{32}")
_SHORTEST_SECRET = 8  # shorter values ("1", "true") would scrub ordinary words


def _credential_params(query: str) -> Iterable[tuple[int, str, str]]:
    for i, part in enumerate(query.split("&")):
        name, eq, value = part.partition("=")
        if eq and value and unquote_plus(name).strip().lower() in CREDENTIAL_PARAMS:
            yield i, name, value


def redact_query(path: str) -> str:
    """`path` with the value of each credential query parameter replaced by [redacted]; all else byte for byte."""
    head, sep, query = path.partition("?")
    if not sep:
        return path
    parts = query.split("&")
    for i, name, _ in _credential_params(query):
        parts[i] = f"{name}={REDACTED}"
    return f"{head}?{'&'.join(parts)}"


def request_secrets(headers: Mapping[str, str], path: str = "") -> tuple[str, ...]:
    """Every credential a request carries (header values without their scheme, Basic passwords, query keys)."""
    found: list[str] = []
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name, "").strip()
        if not value:
            continue
        _, scheme, secret = value.rpartition(" ")  # "Bearer <key>", "Basic <base64>" or the bare key
        found += [secret, proxy_authorization_token(value) or ""] if scheme else [value]
    _, _, query = path.partition("?")
    for _, _, value in _credential_params(query):
        found += [value, unquote_plus(value)]
    return tuple(sorted({secret for secret in found if len(secret) >= _SHORTEST_SECRET}, key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` without any of `secrets` (longest first) and without anything shaped like a Metrion token."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return _METRION_TOKEN.sub(REDACTED, text)
