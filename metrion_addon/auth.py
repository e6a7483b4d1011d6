"""Who is calling: resolve the Metrion token (stored or pass-through mode) and the key to send upstream.

Tokens are looked up by their SHA-256; no secret ever appears in an error message.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from .config import TOKEN_RE, Token, hash_token
from .errors import MetrionError

METRION_PREFIX = "sk-metrion-"
MAX_REQUESTER = 200
_QUERY_KEY = re.compile(r"(?:^|(?<=&))key=([^&]*)&?")


@dataclass(frozen=True)
class Identity:
    token_name: str
    plan: str
    mode: str  # "stored" | "pass-through" | "forward"


@dataclass(frozen=True)
class Upstream:
    """The credential headers to set on the forwarded request (None: leave the client's as they are)."""

    set_headers: Mapping[str, str] | None = None
    drop_headers: tuple[str, ...] = ()


def _unauthorized(message: str, code: str = "invalid_metrion_token") -> MetrionError:
    return MetrionError(401, code, message)


def _lookup(token: str, tokens: Mapping[str, Token]) -> Token:
    if not TOKEN_RE.fullmatch(token):
        raise _unauthorized("Malformed Metrion token: expected sk-metrion- followed by 32 lowercase hex digits.")
    entry = tokens.get(hash_token(token))
    if entry is None:
        raise _unauthorized("Unknown Metrion token.")
    return entry


def lift_query_key(path: str) -> tuple[str, str | None]:
    """Split Google's `?key=` API key out of a path: (the path without it, the key or None)."""
    base, sep, query = path.partition("?")
    keys = _QUERY_KEY.findall(query) if sep else []
    if not keys:
        return path, None
    rest = _QUERY_KEY.sub("", query).strip("&")
    return base + (f"?{rest}" if rest else ""), unquote(keys[0])


_SLOTS = {"anthropic": "x-api-key", "gemini": "x-goog-api-key"}


def _credential_slot(api_format: str, headers: Mapping[str, str]) -> str | None:
    """The provider credential the client sent: x-api-key for Anthropic, x-goog-api-key for Gemini's native API
    (where a `?key=` has been moved), else the Bearer token."""
    slot = _SLOTS.get(api_format)
    if slot and (key := headers.get(slot, "").strip()):
        return key
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def authenticate(
    provider: str, headers: Mapping[str, str], tokens: Mapping[str, Token], api_format: str | None = None
) -> tuple[Identity, Upstream]:
    """Resolve the caller from request headers; raise MetrionError(401) when they can't be metered.

    `api_format` is the route's wire format (anthropic, gemini or openai; default: the provider's usual one):
    it says where the key goes.
    """
    api_format = api_format or ("anthropic" if provider == "anthropic" else "openai")
    credential = _credential_slot(api_format, headers)
    if credential and credential.startswith(METRION_PREFIX):
        entry = _lookup(credential, tokens)
        key = entry.keys.get(provider)
        if key is None:
            raise _unauthorized(
                f"Stored mode: no {provider} key is stored for Metrion token '{entry.name}'. "
                f"Add one under keys: in the Metrion config, or send your own key with x-metrion-token.",
                "no_stored_key",
            )
        secret = key.get_secret_value()
        if header := _SLOTS.get(api_format):
            upstream = Upstream({header: secret}, ("authorization",))
        else:
            upstream = Upstream({"authorization": f"Bearer {secret}"})
        return Identity(entry.name, entry.plan, "stored"), upstream
    token = headers.get("x-metrion-token", "").strip()
    if not token:
        raise _unauthorized(
            "Missing Metrion token: send it as the API key (stored mode), "
            "or your provider key plus an x-metrion-token header (pass-through mode).",
            "missing_metrion_token",
        )
    entry = _lookup(token, tokens)
    return Identity(entry.name, entry.plan, "pass-through"), Upstream()


def proxy_authorization_token(value: str | None) -> str | None:
    """The password of a `Proxy-Authorization: Basic` header, where forward-proxy clients put their token."""
    if not value:
        return None
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:  # ValueError: a non-ASCII character in the header (binascii.Error and UnicodeDecodeError are ValueErrors)
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:
        return None
    _, sep, password = decoded.partition(":")
    return password if sep else None


def identify_forward(value: str | None, tokens: Mapping[str, Token]) -> Identity:
    """Identity of a forward-proxy client from its Proxy-Authorization header; 407 when missing or wrong."""
    token = proxy_authorization_token(value)
    challenge = {"proxy-authenticate": 'Basic realm="metrion"'}
    if not token:
        raise MetrionError(407, "proxy_auth_required", "Metrion: send your Metrion token as the proxy password.",
                           challenge)
    try:
        entry = _lookup(token, tokens)
    except MetrionError as e:
        raise MetrionError(407, "proxy_auth_invalid", f"Metrion: {e.message}", challenge) from None
    return Identity(entry.name, entry.plan, "forward")


def other_host_identity(proxy_authorization: str | None, tokens: Mapping[str, Token], *, tunnel: Identity | None,
                        open_to_all: bool) -> Identity | None:
    """Who may use Metrion as a plain forward proxy to a host that is no provider's; 407 when nobody known.

    The token holder of the tunnel or of the Proxy-Authorization header; anyone (None) only if the config says so.
    """
    if tunnel is not None:
        return tunnel
    if open_to_all:
        return None
    return identify_forward(proxy_authorization, tokens)


def forbid_stray_metrion_token(fields: Iterable[tuple[bytes, bytes]], path: str, replaced: Collection[str]) -> None:
    """Refuse (400) a request that would carry a Metrion token on to the provider, in a header or in the URL.

    Metrion removes x-metrion-*, Proxy-Authorization and the credential headers it `replaced`; a Metrion token
    anywhere else (the key header twice, the other provider's key header, a query parameter) would reach the provider.
    """
    prefix = METRION_PREFIX.encode()
    where = None
    for raw_name, value in fields:
        if prefix not in value.lower():  # the usual case: look at the name only when the value holds a token
            continue
        name = raw_name.decode("latin-1").lower()
        if not name.startswith("x-metrion-") and name != "proxy-authorization" and name not in replaced:
            where = f"the {name} header"
            break
    else:
        if METRION_PREFIX in unquote(path).lower():
            where = "the URL"
    if where is not None:
        raise MetrionError(400, "metrion_token_in_request",
                           f"The request carries a Metrion token in {where}, where it would reach the provider: send "
                           "it only as the API key (stored mode), in x-metrion-token, or as the proxy password.")


def requester(headers: Mapping[str, str]) -> str | None:
    value = headers.get("x-metrion-user", "").strip()[:MAX_REQUESTER]
    return value or None
