"""Metrion paths and provider hosts map to the configured upstream; everything else is not Metrion's."""

from __future__ import annotations

import pytest

from metrion_addon.config import DEFAULT_PROVIDER_URLS
from metrion_addon.routes import (
    Route,
    gemini_native_root,
    host_provider,
    is_metrion_path,
    provider_hosts,
    route_metrion_path,
    route_provider_host,
)

MOCKED = {**DEFAULT_PROVIDER_URLS, "openai": "http://127.0.0.1:9/openai/v1", "gemini": "http://127.0.0.1:9/g"}
CONFIGURED = {**MOCKED, "groq": "http://127.0.0.1:9/groq/openai/v1", "local": "http://127.0.0.1:11434/v1"}
GOOGLE = "https://generativelanguage.googleapis.com"


@pytest.mark.parametrize(
    ("path", "provider", "endpoint", "url", "api"),
    [
        ("/api/proxy/v1/messages", "anthropic", "messages", "https://api.anthropic.com/v1/messages", "messages"),
        ("/api/proxy/messages", "anthropic", "messages", "https://api.anthropic.com/v1/messages", "messages"),
        ("/api/proxy/v1/messages/count_tokens", "anthropic", "messages/count_tokens",
         "https://api.anthropic.com/v1/messages/count_tokens", "other"),
        ("/api/proxy/v1/models?limit=5", "anthropic", "models", "https://api.anthropic.com/v1/models?limit=5",
         "other"),
        ("/api/proxy/openai/v1/chat/completions", "openai", "chat/completions",
         "http://127.0.0.1:9/openai/v1/chat/completions", "chat"),
        ("/api/proxy/openai/chat/completions", "openai", "chat/completions",
         "http://127.0.0.1:9/openai/v1/chat/completions", "chat"),
        ("/api/proxy/openai/v1/responses", "openai", "responses", "http://127.0.0.1:9/openai/v1/responses",
         "responses"),
        ("/api/proxy/gemini/v1/chat/completions", "gemini", "chat/completions", "http://127.0.0.1:9/g/chat/completions",
         "chat"),
        ("/api/proxy/mistral/v1/embeddings", "mistral", "embeddings", "https://api.mistral.ai/v1/embeddings",
         "embeddings"),
        ("/api/proxy/grok/models", "grok", "models", "https://api.x.ai/v1/models", "other"),
        ("/api/proxy/gemini/v1beta/models/gemini-2.5-flash:generateContent", "gemini",
         "v1beta/models/gemini-2.5-flash:generateContent",
         f"{GOOGLE}/v1beta/models/gemini-2.5-flash:generateContent", "generate"),
        ("/api/proxy/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "gemini",
         "v1beta/models/gemini-2.5-flash:streamGenerateContent",
         f"{GOOGLE}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "generate"),
        ("/api/proxy/gemini/v1/models/gemini-2.5-flash:countTokens", "gemini", "v1/models/gemini-2.5-flash:countTokens",
         f"{GOOGLE}/v1/models/gemini-2.5-flash:countTokens", "other"),
        ("/api/proxy/gemini/v1beta/models/gemini-embedding-001:batchEmbedContents", "gemini",
         "v1beta/models/gemini-embedding-001:batchEmbedContents",
         f"{GOOGLE}/v1beta/models/gemini-embedding-001:batchEmbedContents", "embeddings"),
        ("/api/proxy/gemini/v1beta/openai/chat/completions", "gemini", "chat/completions",
         f"{GOOGLE}/v1beta/openai/chat/completions", "chat"),
        ("/api/proxy/gemini/v1/models", "gemini", "models", f"{GOOGLE}/v1beta/openai/models", "other"),
    ],
)
def test_metrion_paths_route_to_the_configured_upstream(path, provider, endpoint, url, api) -> None:
    urls = MOCKED if provider != "gemini" or "127.0.0.1" in url else DEFAULT_PROVIDER_URLS
    route = route_metrion_path(path, urls)
    assert route == Route(provider, endpoint, url)
    assert route.api == api


@pytest.mark.parametrize("path", ["/api/proxy/", "/api/proxy/cohere/v1/chat", "/api/proxy/openai/v1",
                                  "/api/proxy/openai", "/api/proxy/v1", "/api/proxy/gemini", "/api/proxy/groq/v1"])
def test_unknown_metrion_paths_have_no_route(path: str) -> None:
    assert route_metrion_path(path, MOCKED) is None
    assert is_metrion_path(path)


@pytest.mark.parametrize("path", ["/", "/v1/chat/completions", "/api/proxyx/openai", "/api"])
def test_other_paths_are_not_metrions(path: str) -> None:
    assert not is_metrion_path(path)


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("api.openai.com", "/v1/chat/completions", Route("openai", "chat/completions",
                                                          "http://127.0.0.1:9/openai/v1/chat/completions")),
        ("API.Anthropic.com", "/v1/messages?beta=true", Route("anthropic", "messages",
                                                               "https://api.anthropic.com/v1/messages?beta=true")),
        ("generativelanguage.googleapis.com", "/v1beta/openai/chat/completions",
         Route("gemini", "chat/completions", "http://127.0.0.1:9/g/chat/completions")),
        ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-flash:generateContent",
         Route("gemini", "v1beta/models/gemini-2.5-flash:generateContent",
               "http://127.0.0.1:9/v1beta/models/gemini-2.5-flash:generateContent")),
        ("api.groq.com", "/openai/v1/chat/completions",
         Route("groq", "chat/completions", "http://127.0.0.1:9/groq/openai/v1/chat/completions")),
        ("example.com", "/v1/chat/completions", None),
    ],
)
def test_provider_hosts_route_like_metrion_paths(host: str, path: str, expected: Route | None) -> None:
    provider = host_provider(host, 443, provider_hosts(CONFIGURED))
    route = route_provider_host(provider, host, path, CONFIGURED) if provider else None
    assert route == expected


def test_configured_providers_route_under_their_name_and_by_their_own_host_and_port() -> None:
    assert route_metrion_path("/api/proxy/groq/v1/chat/completions", CONFIGURED) == Route(
        "groq", "chat/completions", "http://127.0.0.1:9/groq/openai/v1/chat/completions")
    assert route_metrion_path("/api/proxy/local/chat/completions", CONFIGURED).upstream_url == (
        "http://127.0.0.1:11434/v1/chat/completions")
    hosts = provider_hosts(CONFIGURED)
    assert host_provider("127.0.0.1", 11434, hosts) == "local"
    assert host_provider("127.0.0.1", 8080, hosts) is None  # Metrion's own address is no provider
    assert host_provider("API.GROQ.COM", 443, hosts) == "groq"
    assert host_provider("api.groq.com", 443, provider_hosts(MOCKED)) is None  # not configured: not recognised


@pytest.mark.parametrize(
    ("url", "root"),
    [
        ("https://generativelanguage.googleapis.com/v1beta/openai", "https://generativelanguage.googleapis.com"),
        ("http://127.0.0.1:9/gemini/v1beta/openai/", "http://127.0.0.1:9/gemini"),
        ("http://127.0.0.1:9/g", "http://127.0.0.1:9"),
    ],
)
def test_gemini_native_api_lives_beside_the_configured_compat_url(url: str, root: str) -> None:
    assert gemini_native_root(url.rstrip("/")) == root


def test_gemini_route_knows_its_model_method_and_stream_shape() -> None:
    sse = route_metrion_path("/api/proxy/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", MOCKED)
    array = route_metrion_path("/api/proxy/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent", MOCKED)
    assert (sse.format, sse.model, sse.gemini_method, sse.streams_json_array) == (
        "gemini", "gemini-2.5-pro", "streamGenerateContent", False)
    assert array.streams_json_array and array.model == "gemini-2.5-pro"
    compat = route_metrion_path("/api/proxy/gemini/v1/chat/completions", MOCKED)
    assert (compat.format, compat.model, compat.streams_json_array) == ("openai", None, False)
