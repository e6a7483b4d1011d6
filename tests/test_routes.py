"""Metrion paths and provider hosts map to the configured upstream; everything else is not Metrion's."""

from __future__ import annotations

import pytest

from metrion_addon.config import DEFAULT_PROVIDER_URLS
from metrion_addon.routes import Route, is_metrion_path, route_metrion_path, route_provider_host

MOCKED = {**DEFAULT_PROVIDER_URLS, "openai": "http://127.0.0.1:9/openai/v1", "gemini": "http://127.0.0.1:9/g"}


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
    ],
)
def test_metrion_paths_route_to_the_configured_upstream(path, provider, endpoint, url, api) -> None:
    route = route_metrion_path(path, MOCKED)
    assert route == Route(provider, endpoint, url)
    assert route.api == api


@pytest.mark.parametrize("path", ["/api/proxy/", "/api/proxy/cohere/v1/chat", "/api/proxy/openai/v1",
                                  "/api/proxy/openai", "/api/proxy/v1"])
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
        ("example.com", "/v1/chat/completions", None),
    ],
)
def test_provider_hosts_route_like_metrion_paths(host: str, path: str, expected: Route | None) -> None:
    assert route_provider_host(host, path, MOCKED) == expected
