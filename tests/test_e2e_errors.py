"""Bad input through a real mitmdump: each is answered in the provider's shape, not forwarded, and nothing breaks.

The SDKs must raise their usual exception types for Metrion's own answers.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from harness import APP_TOKEN, CLIENT_KEY, PASS_TOKEN, STORED_KEYS, Proxy
from test_e2e_metering import MODELS, ask, label, sdk

from metrion_addon.mock_provider import MockProvider

UNKNOWN_TOKEN = "sk-metrion-" + "f" * 32


@pytest.mark.parametrize(
    ("provider", "body", "status", "code"),
    [
        ("openai", b'{"model": "gpt-4o", "messages": [', 400, "invalid_request_body"),
        ("anthropic", b"not json at all", 400, "invalid_request_body"),
        ("openai", b'{"model": "gpt-4o"}', 400, "missing_field"),
        ("anthropic", b'{"model": "claude-sonnet-4-20250514", "messages": []}', 400, "missing_field"),
        ("mistral", b"[1, 2]", 400, "invalid_request_body"),
    ],
)
def test_unusable_body_gets_400_in_the_providers_shape_and_is_not_forwarded(
    proxy: Proxy, mock: MockProvider, provider: str, body: bytes, status: int, code: str
) -> None:
    who = label()
    path = "/api/proxy/v1/messages" if provider == "anthropic" else f"/api/proxy/{provider}/v1/chat/completions"
    before = len(mock.received)
    response = httpx.post(f"{proxy.url}{path}", content=body, headers={
        "authorization": f"Bearer {APP_TOKEN}", "content-type": "application/json", "x-metrion-user": who})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if provider == "anthropic":
        assert response.json()["type"] == "error"
    else:
        assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert len(mock.received) == before
    (row,) = proxy.rows("requester = ?", (who,))
    assert (row["status"], row["token_name"], row["usage_source"]) == (400, "app", "none")


@pytest.mark.parametrize(
    ("provider", "key", "headers", "fragment"),
    [
        ("openai", UNKNOWN_TOKEN, {}, "Unknown Metrion token"),
        ("anthropic", UNKNOWN_TOKEN, {}, "Unknown Metrion token"),
        ("openai", "sk-metrion-TOO-SHORT", {}, "Malformed Metrion token"),
        ("gemini", CLIENT_KEY, {}, "Missing Metrion token"),
        ("mistral", CLIENT_KEY, {"x-metrion-token": UNKNOWN_TOKEN}, "Unknown Metrion token"),
        ("grok", PASS_TOKEN, {}, "no grok key is stored"),  # stored mode, but this token stores no keys
        ("anthropic", PASS_TOKEN, {}, "no anthropic key is stored"),
    ],
)
def test_unknown_or_missing_token_is_401_and_the_sdk_raises_authentication_error(
    proxy: Proxy, mock: MockProvider, provider: str, key: str, headers: dict, fragment: str
) -> None:
    who = label()
    before = len(mock.received)
    headers = {**headers, "x-metrion-user": who}
    if provider == "anthropic":
        client = anthropic.Anthropic(base_url=f"{proxy.url}/api/proxy", api_key=key, default_headers=headers,
                                     max_retries=0)
        error_type: type[Exception] = anthropic.AuthenticationError
    else:
        client = openai.OpenAI(base_url=f"{proxy.url}/api/proxy/{provider}/v1", api_key=key,
                               default_headers=headers, max_retries=0)
        error_type = openai.AuthenticationError
    with pytest.raises(error_type, match=fragment):
        ask(client, provider, "hello", stream=False)
    assert len(mock.received) == before
    (row,) = proxy.rows("requester = ?", (who,))
    assert row["status"] == 401 and fragment in row["error"]
    assert key not in row["error"]


def test_unknown_route_is_a_json_404(proxy: Proxy, mock: MockProvider) -> None:
    before = len(mock.received)
    for path in ("/api/proxy/cohere/v1/chat", "/api/proxy/", "/api/proxy/openai/v1"):
        response = httpx.post(f"{proxy.url}{path}", json={}, headers={"authorization": f"Bearer {APP_TOKEN}"})
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "unknown_route"
    assert len(mock.received) == before


def test_server_is_healthy_after_bad_input(proxy: Proxy) -> None:
    for body in (b"{", b"\xff\xfe", b"", b"null"):
        httpx.post(f"{proxy.url}/api/proxy/openai/v1/chat/completions", content=body,
                   headers={"authorization": f"Bearer {APP_TOKEN}", "content-type": "application/json"})
    assert ask(sdk(proxy, "openai", "stored", label()), "openai", "still there?", stream=True).startswith("Echo")


def test_secrets_never_reach_the_database_or_the_log(proxy: Proxy) -> None:
    ask(sdk(proxy, "openai", "pass-through", label()), "openai", "secret check", stream=False)
    ask(sdk(proxy, "anthropic", "stored", label()), "anthropic", "secret check", stream=True)
    proxy.rows(n=2)
    secrets = [APP_TOKEN, PASS_TOKEN, CLIENT_KEY, *STORED_KEYS.values()]
    stored = proxy.db_path.read_bytes() + proxy.db_path.with_name(proxy.db_path.name + "-wal").read_bytes()
    logged = proxy.log_path.read_bytes()
    for secret in secrets:
        assert secret.encode() not in stored
        assert secret.encode() not in logged


def test_every_provider_model_answers_through_both_sdks(proxy: Proxy) -> None:
    # Sanity: all five routes answer for a plain call (a failing route would otherwise hide behind params).
    for provider in MODELS:
        assert ask(sdk(proxy, provider, "stored", label()), provider, "ping", stream=False).startswith("Echo")


CASES = [  # (status, what to send) for each of Metrion's own answers
    (400, {"body": {"model": "m"}}),
    (401, {"key": UNKNOWN_TOKEN}),
    (404, {"path": "/api/proxy/cohere/v1/chat"}),
    (429, {"scenario": None, "rate_limited": True}),
    (502, {"scenario": "reset"}),
    (504, {"scenario": "slow-headers:3"}),
]
EXCEPTIONS = {
    400: (anthropic.BadRequestError, openai.BadRequestError),
    401: (anthropic.AuthenticationError, openai.AuthenticationError),
    404: (anthropic.NotFoundError, openai.NotFoundError),
    429: (anthropic.RateLimitError, openai.RateLimitError),
    502: (anthropic.InternalServerError, openai.InternalServerError),
    504: (anthropic.InternalServerError, openai.InternalServerError),
}


@pytest.fixture(scope="module")
def strict_proxy(mock: MockProvider, tmp_path_factory: pytest.TempPathFactory):
    """Timeout 1 s, 3 requests a minute, and a token of its own for each case below."""
    from harness import base_config, token

    workdir = tmp_path_factory.mktemp("strict")
    tokens = [{"name": f"case{n}", "token": token(100 + n), "plan": "pro", "keys": STORED_KEYS} for n in range(20)]
    running = Proxy(workdir, base_config(mock.base_url, workdir / "metrion.db", timeout=1, rate_limit=3,
                                         tokens=tokens)).start()
    yield running
    running.stop()


_case_tokens = iter(range(100, 120))


@pytest.mark.parametrize("flavour", ["anthropic", "openai"])
@pytest.mark.parametrize(("status", "case"), CASES, ids=[str(status) for status, _ in CASES])
def test_metrion_errors_surface_as_the_sdks_own_exceptions(strict_proxy: Proxy, flavour: str, status: int,
                                                          case: dict) -> None:
    from harness import token

    anthropic_error, openai_error = EXCEPTIONS[status]
    headers = {"x-mock-scenario": case["scenario"]} if case.get("scenario") else {}
    key = case.get("key", token(next(_case_tokens)))
    if flavour == "anthropic":
        client = anthropic.Anthropic(base_url=f"{strict_proxy.url}/api/proxy", api_key=key, max_retries=0,
                                     default_headers=headers)
        path, expected = case.get("path", "/v1/messages"), anthropic_error
        body = case.get("body", {"model": MODELS["anthropic"], "max_tokens": 5,
                                 "messages": [{"role": "user", "content": "x"}]})
    else:
        client = openai.OpenAI(base_url=f"{strict_proxy.url}/api/proxy/openai/v1", api_key=key, max_retries=0,
                               default_headers=headers)
        path, expected = case.get("path", "/chat/completions"), openai_error
        body = case.get("body", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    if case.get("path"):
        client = client.with_options(base_url=strict_proxy.url)
    for _ in range(3 if case.get("rate_limited") else 0):  # empty this token's bucket
        client.post(path, body=body, cast_to=object)
    with pytest.raises(expected) as caught:
        client.post(path, body=body, cast_to=object)
    assert caught.value.status_code == status
    assert caught.value.response.headers["x-metrion-error"]
    error = caught.value.response.json()
    if status == 404:  # no provider in the path, so no provider shape: the OpenAI-style one, which both SDKs read
        assert error["error"]["code"] == "unknown_route"
    elif flavour == "anthropic":
        assert error["type"] == "error" and caught.value.body["error"]["message"]
    else:
        assert caught.value.code == error["error"]["code"] and caught.value.type == error["error"]["type"]
