"""Zero-code metering: SDKs that call the providers' own hosts through HTTPS_PROXY, token as proxy password.

The proxy has its own confdir and CA; `providers:` sends the calls to the mock instead of the real hosts.
"""

from __future__ import annotations

import json
import ssl
import subprocess

import anthropic
import httpx
import openai
import pytest
from harness import CLIENT_KEY, Proxy, token
from test_e2e_metering import MODELS, label

from metrion_addon.mock_provider import MockProvider, reply_text

FORWARD = token(11)
CAPPED = token(12)


@pytest.fixture(scope="module")
def forward_proxy(mock: MockProvider, tmp_path_factory: pytest.TempPathFactory):
    from harness import base_config

    workdir = tmp_path_factory.mktemp("forward")
    config = base_config(mock.base_url, workdir / "metrion.db")
    config["plans"]["capped"] = {"monthly_requests": 1}
    config["tokens"] += [{"name": "zero-code", "token": FORWARD, "plan": "pro"},
                         {"name": "capped", "token": CAPPED, "plan": "capped"}]
    running = Proxy(workdir, config).start()
    yield running
    running.stop()


def proxied(monkeypatch: pytest.MonkeyPatch, proxy: Proxy, password: str | None = FORWARD) -> None:
    auth = f"metrion:{password}@" if password else ""
    monkeypatch.setenv("HTTPS_PROXY", f"http://{auth}127.0.0.1:{proxy.port}")
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_cert))
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_sdks_calling_provider_hosts_are_metered_under_the_proxy_token(
    forward_proxy: Proxy, mock: MockProvider, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    proxied(monkeypatch, forward_proxy)
    who = label()
    messages = [{"role": "user", "content": f"zero code {who}"}]
    gpt = openai.OpenAI(api_key=CLIENT_KEY, max_retries=0, default_headers={"x-metrion-user": who})
    claude = anthropic.Anthropic(api_key=CLIENT_KEY, max_retries=0, default_headers={"x-metrion-user": who})
    if stream:
        chunks = gpt.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with claude.messages.stream(model=MODELS["anthropic"], max_tokens=64, messages=messages) as events:
            claude_text = "".join(events.text_stream)
    else:
        text = gpt.chat.completions.create(model="gpt-4o", messages=messages).choices[0].message.content
        answer = claude.messages.create(model=MODELS["anthropic"], max_tokens=64, messages=messages)
        claude_text = answer.content[0].text
    assert text == claude_text == reply_text({"messages": messages})

    rows = forward_proxy.rows("requester = ?", (who,), n=2)
    assert [(r["provider"], r["token_name"], r["auth_mode"], r["usage_source"], r["status"]) for r in rows] == [
        ("openai", "zero-code", "forward", "provider", 200), ("anthropic", "zero-code", "forward", "provider", 200)]
    assert all(r["input_tokens"] > 0 and r["output_tokens"] > 0 for r in rows)
    sent = [r for r in mock.received if who.encode() in r.body]
    assert len(sent) == 2
    for received in sent:
        assert CLIENT_KEY in (received.headers.get("authorization", "") + received.headers.get("x-api-key", ""))
        assert "proxy-authorization" not in received.headers


@pytest.mark.parametrize("password", [None, "sk-metrion-" + "9" * 32, "not-a-token"])
def test_provider_traffic_without_a_valid_token_gets_407(
    forward_proxy: Proxy, mock: MockProvider, monkeypatch: pytest.MonkeyPatch, password: str | None
) -> None:
    before = len(mock.received)
    auth = (f"metrion:{password}@" if password else "")
    trust = ssl.create_default_context(cafile=forward_proxy.ca_cert)
    with httpx.Client(proxy=f"http://{auth}127.0.0.1:{forward_proxy.port}", verify=trust) as client:
        with pytest.raises(httpx.ProxyError, match="407"):
            client.post("https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o", "messages": []})
        response = client.post("http://api.openai.com/v1/chat/completions", json={"model": "gpt-4o", "messages": []})
    assert response.status_code == 407 and response.headers["proxy-authenticate"].startswith("Basic")
    assert len(mock.received) == before


def test_limits_apply_to_forward_proxy_traffic(forward_proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    proxied(monkeypatch, forward_proxy, CAPPED)
    gpt = openai.OpenAI(api_key=CLIENT_KEY, max_retries=0)
    messages = [{"role": "user", "content": "capped"}]
    assert gpt.chat.completions.create(model="gpt-4o", messages=messages).choices
    with pytest.raises(openai.RateLimitError, match="Monthly request cap"):
        gpt.chat.completions.create(model="gpt-4o", messages=messages)


def test_other_hosts_pass_through_untouched_for_token_holders(forward_proxy: Proxy, mock: MockProvider) -> None:
    with httpx.Client(proxy=f"http://m:{FORWARD}@127.0.0.1:{forward_proxy.port}") as client:
        response = client.get(f"http://127.0.0.1:{mock.port}/openai/v1/models")
    assert response.status_code == 200 and response.json()["data"]
    assert "proxy-authorization" not in mock.received[-1].headers


def test_other_hosts_can_be_blocked(start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy(block_other_hosts=True)
    trust = ssl.create_default_context(cafile=proxy.ca_cert)
    with httpx.Client(proxy=f"http://127.0.0.1:{proxy.port}", verify=trust) as client:
        response = client.get(f"http://127.0.0.1:{mock.port}/openai/v1/models")
        assert response.status_code == 403 and "blocks other hosts" in response.json()["error"]["message"]
        with pytest.raises(httpx.ProxyError, match="403"):
            client.get("https://example.com/")


def test_timeouts_reach_tunnelled_clients_as_504_over_http1_and_http2(start_proxy) -> None:
    proxy = start_proxy(timeout=1, tokens=[{"name": "zero-code", "token": FORWARD, "plan": "pro"}])
    body = {"model": MODELS["anthropic"], "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    trust = ssl.create_default_context(cafile=proxy.ca_cert)
    with httpx.Client(proxy=f"http://m:{FORWARD}@127.0.0.1:{proxy.port}", verify=trust) as client:
        response = client.post("https://api.anthropic.com/v1/messages", json=body,
                               headers={"x-mock-scenario": "slow-headers:4"})
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        assert client.get("https://api.openai.com/v1/models").status_code == 200  # the connection carries on
    # HTTP/2 to the proxy (curl negotiates h2 inside the tunnel; httpx prefers HTTP/1.1 there)
    curl = subprocess.run(
        ["curl", "-s", "--http2", "-x", f"http://m:{FORWARD}@127.0.0.1:{proxy.port}", "--cacert", str(proxy.ca_cert),
         "-H", "x-mock-scenario: slow-headers:4", "-H", "content-type: application/json", "--data", json.dumps(body),
         "-w", "\n%{http_version} %{http_code}", "https://api.anthropic.com/v1/messages"],
        capture_output=True, text=True, timeout=20, check=True,
    )
    answer, _, status = curl.stdout.rpartition("\n")
    assert status == "2 504" and json.loads(answer)["error"]["type"] == "timeout_error"
