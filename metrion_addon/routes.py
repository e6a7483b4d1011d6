"""Where a request goes: map a Metrion path (or a provider host, in forward-proxy use) to its upstream URL.

Pure functions over the configured provider base URLs; no mitmproxy imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import DEFAULT_PROVIDER_URLS

PREFIX = "/api/proxy/"
_OPENAI_STYLE = ("openai", "gemini", "mistral", "grok")
PROVIDER_HOSTS = {urlsplit(url).hostname: name for name, url in DEFAULT_PROVIDER_URLS.items()}


@dataclass(frozen=True)
class Route:
    provider: str
    endpoint: str  # the path below the provider's base URL, e.g. "chat/completions"
    upstream_url: str

    @property
    def api(self) -> str:
        """Which wire format the endpoint speaks: messages, chat, responses, embeddings or other."""
        if self.provider == "anthropic" and self.endpoint == "messages":
            return "messages"
        if self.endpoint in ("chat/completions", "completions"):
            return "chat"
        if self.endpoint in ("responses", "embeddings"):
            return self.endpoint
        return "other"


def _join(base: str, endpoint: str, query: str) -> str:
    return f"{base}/{endpoint}" + (f"?{query}" if query else "")


def route_metrion_path(path: str, providers: Mapping[str, str]) -> Route | None:
    """Route `/api/proxy/...` (path may carry a query); None if it names no provider endpoint."""
    path, _, query = path.partition("?")
    rest = path.removeprefix(PREFIX).strip("/")
    first, _, tail = rest.partition("/")
    if first == "v1":
        provider, endpoint = "anthropic", tail
    elif first == "messages":
        provider, endpoint = "anthropic", rest
    elif first in _OPENAI_STYLE:
        provider, endpoint = first, tail.removeprefix("v1/") if tail != "v1" else ""
    else:
        return None
    if not endpoint:
        return None
    return Route(provider, endpoint, _join(providers[provider], endpoint, query))


def route_provider_host(host: str, path: str, providers: Mapping[str, str]) -> Route | None:
    """Route a direct call to a provider's own host (forward-proxy use); None if the host is no provider's."""
    provider = PROVIDER_HOSTS.get(host.lower())
    if provider is None:
        return None
    path, _, query = path.partition("?")
    default_base = urlsplit(DEFAULT_PROVIDER_URLS[provider]).path  # e.g. /v1beta/openai
    if path.startswith(default_base + "/"):
        endpoint = path[len(default_base) + 1 :]
        return Route(provider, endpoint, _join(providers[provider], endpoint, query))
    configured = urlsplit(providers[provider])
    origin = f"{configured.scheme}://{configured.netloc}"
    return Route(provider, path.lstrip("/"), origin + path + (f"?{query}" if query else ""))


def is_metrion_path(path: str) -> bool:
    return path.startswith(PREFIX) or path == PREFIX.rstrip("/")
