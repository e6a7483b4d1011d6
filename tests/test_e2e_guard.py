"""Fail closed: whatever Metrion's own code raises, in whichever hook, no request passes unadmitted and every
request leaves its row. Faults are injected into a real mitmdump by tests/fault_injection.py."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import openai
import pytest
from harness import APP_TOKEN, CLIENT_KEY, PASS_TOKEN, STORED_KEYS, Proxy, base_config, token
from test_e2e_metering import MODELS, label

from metrion_addon.mock_provider import MockProvider, reply_text

FAULTS = Path(__file__).with_name("fault_injection.py")
FORWARD = token(21)


@pytest.fixture(scope="module")
def faulty_proxy(mock: MockProvider, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("faulty")
    config = base_config(mock.base_url, workdir / "metrion.db")
    config["tokens"].append({"name": "forward", "token": FORWARD, "plan": "pro"})
    running = Proxy(workdir, config, scripts=(FAULTS,)).start()
    yield running
    running.stop()


def chat(provider: str, text: str, stream: bool = False) -> tuple[str, dict]:
    path = "/api/proxy/v1/messages" if provider == "anthropic" else f"/api/proxy/{provider}/v1/chat/completions"
    body = {"model": MODELS[provider], "max_tokens": 64, "messages": [{"role": "user", "content": text}],
            "stream": stream}
    return path, body


def secrets_sent_to(mock: MockProvider, who: str) -> list[str]:
    """Every x-metrion-* header and Metrion token the mock received for requests of `who`."""
    found = []
    for received in mock.received:
        if who.encode() not in received.body:
            continue
        found += [name for name in received.headers if name.startswith("x-metrion-")]
        found += [value for value in received.headers.values() if "sk-metrion-" in value]
    return found


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("fault", ["request", "request-after"])
def test_a_request_hook_that_raises_gets_a_provider_shaped_500_and_is_never_forwarded(
    faulty_proxy: Proxy, mock: MockProvider, provider: str, fault: str
) -> None:
    who = label()
    path, body = chat(provider, f"never forwarded {who}")
    response = httpx.post(faulty_proxy.url + path, json=body, headers={
        "authorization": f"Bearer {CLIENT_KEY}", "x-api-key": CLIENT_KEY, "x-metrion-token": PASS_TOKEN,
        "x-metrion-user": who, "x-fault": fault})
    assert response.status_code == 500
    assert response.headers["x-metrion-error"] == "metrion_internal_error"
    error = response.json()["error"]
    if provider == "anthropic":
        assert response.json()["type"] == "error" and error["type"] == "api_error"
    else:
        assert error["code"] == "metrion_internal_error" and error["type"] == "server_error"
    assert "InjectedFault" in error["message"] and "not forwarded" in error["message"]
    assert not [r for r in mock.received if who.encode() in r.body]
    (row,) = faulty_proxy.rows("requester = ?", (who,))
    assert row["status"] == 500 and "InjectedFault" in row["error"]


@pytest.mark.parametrize(("fault", "stream"), [
    ("responseheaders", False), ("responseheaders-after", False), ("responseheaders", True),
    ("response", False), ("response-after", False), ("response", True), ("response-after", True),
    ("stream-tap", True),
])
def test_a_failure_while_metering_the_answer_still_delivers_it_and_leaves_the_row(
    faulty_proxy: Proxy, mock: MockProvider, fault: str, stream: bool
) -> None:
    who = label()
    text = f"{"FAULT" * 20} {who}" if fault == "stream-tap" else f"answered {who}"
    client = openai.OpenAI(base_url=f"{faulty_proxy.url}/api/proxy/openai/v1", api_key=APP_TOKEN, max_retries=0,
                           default_headers={"x-metrion-user": who, "x-fault": fault})
    messages = [{"role": "user", "content": text}]
    if stream:
        chunks = client.chat.completions.create(model="gpt-4o", messages=messages, stream=True, timeout=10)
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        completion = client.chat.completions.create(model="gpt-4o", messages=messages, timeout=10)
        answer = completion.choices[0].message.content
    assert answer == reply_text({"messages": messages})
    assert len([r for r in mock.received if who.encode() in r.body]) == 1
    assert secrets_sent_to(mock, who) == []
    (row,) = faulty_proxy.rows("requester = ?", (who,))
    assert row["status"] == 200 and row["token_name"] == "app"
    if fault == "response-after":  # the row was complete before the hook failed: nothing was lost
        assert row["usage_source"] == "provider" and row["error"] is None
    else:
        assert "Metrion internal error while metering" in row["error"]


@pytest.mark.parametrize("fault", ["error", "error-after"])
def test_a_failing_error_hook_still_leaves_the_row_of_a_cut_stream(
    faulty_proxy: Proxy, mock: MockProvider, fault: str
) -> None:
    who = label()
    path, body = chat("anthropic", who, stream=True)
    headers = {"x-api-key": APP_TOKEN, "x-metrion-user": who, "x-fault": fault, "x-mock-scenario": "cut-after:3"}
    with httpx.stream("POST", faulty_proxy.url + path, json=body, headers=headers, timeout=10) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()
    (row,) = faulty_proxy.rows("requester = ?", (who,))
    assert row["token_name"] == "app" and row["status"] == 200 and row["error"]


def test_a_failing_hook_on_a_provider_host_in_forward_mode_is_refused_without_leaking_credentials(
    faulty_proxy: Proxy, mock: MockProvider
) -> None:
    who = label()
    trust = ssl.create_default_context(cafile=faulty_proxy.ca_cert)
    _, body = chat("openai", f"forward fault {who}")
    with httpx.Client(proxy=f"http://m:{FORWARD}@127.0.0.1:{faulty_proxy.port}", verify=trust) as client:
        response = client.post("https://api.openai.com/v1/chat/completions", json=body, headers={
            "authorization": f"Bearer {CLIENT_KEY}", "x-metrion-user": who, "x-fault": "request-after"})
        assert response.status_code == 500 and response.json()["error"]["code"] == "metrion_internal_error"
        ok = client.post("https://api.openai.com/v1/chat/completions", json=body, headers={
            "authorization": f"Bearer {CLIENT_KEY}", "x-metrion-user": who})
        assert ok.status_code == 200
    assert len([r for r in mock.received if who.encode() in r.body]) == 1  # the second one
    assert secrets_sent_to(mock, who) == []
    rows = faulty_proxy.rows("requester = ?", (who,), n=2)
    assert [(r["status"], r["auth_mode"]) for r in rows] == [(500, "forward"), (200, "forward")]


def test_secrets_of_refused_requests_stay_out_of_the_database_and_log(faulty_proxy: Proxy) -> None:
    who = label()
    path, body = chat("openai", who)
    httpx.post(faulty_proxy.url + path, json=body, headers={
        "authorization": f"Bearer {APP_TOKEN}", "x-metrion-user": who, "x-fault": "request-after"})
    faulty_proxy.rows("requester = ?", (who,), n=1)
    stored = faulty_proxy.db_path.read_bytes() + faulty_proxy.db_path.with_name("metrion.db-wal").read_bytes()
    for secret in (APP_TOKEN, PASS_TOKEN, FORWARD, CLIENT_KEY, *STORED_KEYS.values()):
        assert secret.encode() not in stored and secret.encode() not in faulty_proxy.log_path.read_bytes()
