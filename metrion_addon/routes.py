"""Where a request goes: map a Metrion path (or a provider host, in forward-proxy use) to its upstream URL.

Pure functions over the configured provider base URLs; no mitmproxy imports.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import DEFAULT_PROVIDER_URLS, KNOWN_COMPATIBLE_URLS

PREFIX = "/api/proxy/"
PROVIDER_HOSTS = {urlsplit(url).hostname: name for name, url in DEFAULT_PROVIDER_URLS.items()}
_GEMINI_VERSIONS = ("v1beta", "v1alpha", "v1")
_GEMINI_COMPAT_SUFFIX = re.compile(r"/(?:v1beta|v1alpha|v1)/openai$")
_GEMINI_METHOD = re.compile(r"models/([^/:]+):(\w+)$")
_STREAM_METHODS = ("streamGenerateContent",)


@dataclass(frozen=True)
class Route:
    provider: str
    endpoint: str  # the path below the provider's base URL, e.g. "chat/completions"; Gemini native: "v1beta/models/…"
    upstream_url: str

    @property
    def format(self) -> str:
        """The wire format: anthropic, gemini (Google's native API) or openai (everything else)."""
        if self.provider == "anthropic":
            return "anthropic"
        if self.provider == "gemini" and self.endpoint.partition("/")[0] in _GEMINI_VERSIONS:
            return "gemini"
        return "openai"

    @property
    def api(self) -> str:
        """Which kind of endpoint: messages, chat, responses, generate (Gemini), embeddings or other."""
        if self.format == "anthropic":
            return "messages" if self.endpoint == "messages" else "other"
        if self.format == "gemini":
            method = self.gemini_method
            if method in ("generateContent", *_STREAM_METHODS):
                return "generate"
            return "embeddings" if method in ("embedContent", "batchEmbedContents") else "other"
        if self.endpoint in ("chat/completions", "completions"):
            return "chat"
        if self.endpoint in ("responses", "embeddings"):
            return self.endpoint
        return "other"

    @property
    def gemini_method(self) -> str | None:
        match = _GEMINI_METHOD.search(self.endpoint) if self.format == "gemini" else None
        return match.group(2) if match else None

    @property
    def model(self) -> str | None:
        """The model named in the path (Gemini's native API), else None."""
        match = _GEMINI_METHOD.search(self.endpoint) if self.format == "gemini" else None
        return match.group(1) if match else None

    @property
    def streams_json_array(self) -> bool:
        """Gemini's streamGenerateContent without alt=sse answers one JSON array, sent element by element."""
        return self.gemini_method in _STREAM_METHODS and "alt=sse" not in self.upstream_url.partition("?")[2]


def _join(base: str, endpoint: str, query: str) -> str:
    return f"{base}/{endpoint}" + (f"?{query}" if query else "")


def gemini_native_root(url: str) -> str:
    """Where Gemini's native API lives, given the configured OpenAI-compatible base URL.

    `https://generativelanguage.googleapis.com/v1beta/openai` gives the host; any other URL's `/v1beta/openai`
    suffix is cut off likewise, and a URL without one gives its origin.
    """
    if _GEMINI_COMPAT_SUFFIX.search(url):
        return _GEMINI_COMPAT_SUFFIX.sub("", url)
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _gemini(tail: str, base: str, query: str) -> Route:
    """A path below /api/proxy/gemini/: Google's native API when it names an API version, else the compat API."""
    version, _, rest = tail.partition("/")
    if version in _GEMINI_VERSIONS and rest.startswith("openai/"):
        endpoint = rest.removeprefix("openai/")
        return Route("gemini", endpoint, _join(base, endpoint, query))
    if version in ("v1beta", "v1alpha") or (version == "v1" and _GEMINI_METHOD.search(rest)):
        return Route("gemini", tail, _join(gemini_native_root(base), tail, query))
    endpoint = tail.removeprefix("v1/") if tail != "v1" else ""
    return Route("gemini", endpoint, _join(base, endpoint, query))


def route_metrion_path(path: str, providers: Mapping[str, str]) -> Route | None:
    """Route `/api/proxy/...` (path may carry a query) over provider base URLs; None if it names no endpoint."""
    path, _, query = path.partition("?")
    rest = path.removeprefix(PREFIX).strip("/")
    first, _, tail = rest.partition("/")
    if first == "v1":
        route = Route("anthropic", tail, _join(providers["anthropic"], tail, query))
    elif first == "messages":
        route = Route("anthropic", rest, _join(providers["anthropic"], rest, query))
    elif first == "gemini" and tail:
        route = _gemini(tail, providers["gemini"], query)
    elif first in providers and first != "anthropic":
        endpoint = tail.removeprefix("v1/") if tail != "v1" else ""
        route = Route(first, endpoint, _join(providers[first], endpoint, query))
    else:
        return None
    return route if route.endpoint else None


def provider_hosts(providers: Mapping[str, str]) -> dict[str, str]:
    """Host names that mean a provider in forward-proxy use: `host` for public ones, `host:port` for the rest.

    The five built-in providers and the known OpenAI-compatible ones are recognised by their public host, wherever
    the config sends their calls; any other configured provider by the host and port of its configured URL.
    """
    hosts = dict(PROVIDER_HOSTS)
    for name, url in providers.items():
        if name in DEFAULT_PROVIDER_URLS:
            continue
        if name in KNOWN_COMPATIBLE_URLS:
            hosts[urlsplit(KNOWN_COMPATIBLE_URLS[name]).hostname or ""] = name
        parts = urlsplit(url)
        hosts[f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"] = name
    return hosts


def host_provider(host: str, port: int, hosts: Mapping[str, str]) -> str | None:
    """The provider a forward-proxy request to host:port is for, or None."""
    host = host.lower()
    return hosts.get(f"{host}:{port}") or hosts.get(host)


def route_provider_host(provider: str, host: str, path: str, providers: Mapping[str, str]) -> Route:
    """Route a direct call to a provider's own host (forward-proxy use) to where the config sends that provider."""
    path, _, query = path.partition("?")
    public = DEFAULT_PROVIDER_URLS.get(provider) or KNOWN_COMPATIBLE_URLS.get(provider)
    reference = public if public and urlsplit(public).hostname == host.lower() else providers[provider]
    base_path = urlsplit(reference).path.rstrip("/")  # e.g. /v1beta/openai
    if path.startswith(base_path + "/"):
        endpoint = path[len(base_path) + 1 :]
        return Route(provider, endpoint, _join(providers[provider], endpoint, query))
    if provider == "gemini":
        endpoint = path.lstrip("/")
        return Route(provider, endpoint, _join(gemini_native_root(providers[provider]), endpoint, query))
    configured = urlsplit(providers[provider])
    origin = f"{configured.scheme}://{configured.netloc}"
    return Route(provider, path.lstrip("/"), origin + path + (f"?{query}" if query else ""))


def is_metrion_path(path: str) -> bool:
    return path.startswith(PREFIX) or path == PREFIX.rstrip("/")


@functools.lru_cache(maxsize=256)
def upstream_target(url: str) -> tuple[str, str, int, str]:
    """Scheme, host, port and path (with query) of `url`: what a forwarded request's fields are set to."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), path
