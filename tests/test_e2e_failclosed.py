"""Issue 9, the hook side: one regression test per defect (2, 4, 6, 7, 8, 9), each through a real mitmdump.

Deep JSON, the forward proxy's authentication, idle bodies, secrets in query strings and provider errors, bare
`mitmdump -s`, and a bad config; and the stray Metrion tokens the fuzz suite found. The others live beside their
rooms: defects 1 and 5 (the writer, a second process) and kill -9 in test_e2e_writer.py, defect 3 (a full disk) in
test_e2e_disk_full.py and test_store.py, the fuzz suite in test_e2e_fuzz.py, the guard in test_e2e_guard.py.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from harness import APP_TOKEN, CLIENT_KEY, MITMDUMP, PASS_TOKEN, ROOT, STORED_KEYS, Proxy, free_port, token
from mitmproxy import io
from test_e2e_metering import MODELS, label

from metrion_addon.mock_provider import MockProvider, reply_text

FORWARD = token(31)
FORWARD_TOKENS = [{"name": "forward", "token": FORWARD, "plan": "pro", "keys": dict(STORED_KEYS)}]
DEEP = 5000
GEMINI_KEY = "AIzaSyD-not-a-real-key-0123456789abcdef"


def deep_body(model: str = "gpt-4o") -> bytes:
    """A chat body whose `messages` nest DEEP levels: valid JSON, fatal to a recursive parser."""
    return b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "x": ' % model.encode() + (
        b"[" * DEEP + b"]" * DEEP + b"}")


def received_with(mock: MockProvider, marker: str) -> list:
    return [r for r in mock.received if marker in r.headers.get("x-case", "")]


def leaked(mock: MockProvider, marker: str) -> list[str]:
    """x-metrion-* headers, proxy credentials and Metrion tokens that reached the upstream for `marker`."""
    found = []
    for received in received_with(mock, marker):
        found += [name for name in received.headers if name.startswith("x-metrion-") or name == "proxy-authorization"]
        found += [value for value in received.headers.values() if "sk-metrion-" in value]
    return found


# defect 2: deep JSON


def test_deeply_nested_request_body_is_refused_and_never_forwarded(start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy(plans={"two": {"monthly_requests": 2}},
                        tokens=[{"name": "capped", "token": APP_TOKEN, "plan": "two", "keys": dict(STORED_KEYS)}])
    case = label()
    for _ in range(5):
        response = httpx.post(f"{proxy.url}/api/proxy/openai/v1/chat/completions", content=deep_body(), headers={
            "authorization": f"Bearer {APP_TOKEN}", "content-type": "application/json", "x-metrion-user": case,
            "x-case": case})
        assert response.status_code == 400
        assert "nested too deeply" in response.json()["error"]["message"]
    assert received_with(mock, case) == []
    rows = proxy.rows("requester = ?", (case,), n=5)
    assert [row["status"] for row in rows] == [400] * 5


def test_deeply_nested_body_through_the_forward_proxy_goes_nowhere(start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy(tokens=FORWARD_TOKENS)
    case = label()
    with httpx.Client(proxy=f"http://m:{FORWARD}@127.0.0.1:{proxy.port}") as client:
        response = client.post("http://api.openai.com/v1/chat/completions", content=deep_body(), headers={
            "authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json", "x-case": case,
            "host": f"127.0.0.1:{mock.port}"})
    assert response.status_code == 400 and received_with(mock, case) == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_deeply_nested_reply_reaches_the_client_and_leaves_its_row(proxy: Proxy, mock: MockProvider,
                                                                    stream: bool) -> None:
    case = label()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": case}], "stream": stream}
    with httpx.stream("POST", f"{proxy.url}/api/proxy/openai/v1/chat/completions", json=body, timeout=10, headers={
            "authorization": f"Bearer {APP_TOKEN}", "x-metrion-user": case,
            "x-mock-scenario": f"deep-reply:{DEEP}"}) as response:
        answer = response.read()
    assert response.status_code == 200 and b"[" * DEEP in answer
    assert (reply_text({"messages": body["messages"]}) in answer.decode()) if not stream else b"[DONE]" in answer
    (row,) = proxy.rows("requester = ?", (case,))
    assert row["status"] == 200 and row["model"].startswith("gpt-4o")
    assert (row["usage_source"], row["error"]) == ("provider", None)


# defect 4: the forward proxy


def test_forward_proxy_requires_the_token_for_every_host(start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy(tokens=FORWARD_TOKENS)
    case = label()
    other = f"http://127.0.0.1:{mock.port}/openai/v1/models"
    with httpx.Client(proxy=f"http://127.0.0.1:{proxy.port}") as anonymous:
        refused = anonymous.get(other, headers={"x-case": case})
        assert refused.status_code == 407 and refused.headers["proxy-authenticate"].startswith("Basic")
        with pytest.raises(httpx.ProxyError, match="407"):
            anonymous.get("https://example.com/")
    with httpx.Client(proxy=f"http://m:sk-metrion-{'9' * 32}@127.0.0.1:{proxy.port}") as wrong:
        assert wrong.get(other, headers={"x-case": case}).status_code == 407
    assert received_with(mock, case) == []
    with httpx.Client(proxy=f"http://m:{FORWARD}@127.0.0.1:{proxy.port}") as client:
        assert client.get(other, headers={"x-case": case}).status_code == 200
    assert len(received_with(mock, case)) == 1 and leaked(mock, case) == []


def test_unauthenticated_pass_through_only_when_the_config_allows_it(start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy(tokens=FORWARD_TOKENS, allow_other_hosts_without_token=True)
    case = label()
    other = f"http://127.0.0.1:{mock.port}/openai/v1/models"
    with httpx.Client(proxy=f"http://127.0.0.1:{proxy.port}") as anonymous:
        assert anonymous.get(other, headers={"x-case": case}).status_code == 200
    with httpx.Client(proxy=f"http://m:{FORWARD}@127.0.0.1:{proxy.port}") as client:
        assert client.get(other, headers={"x-case": case}).status_code == 200
        refused = client.post("http://api.openai.com/v1/chat/completions", json={}, headers={
            "proxy-authorization": "Basic " + base64.b64encode(b"m:nope").decode(), "x-case": case})
    assert len(received_with(mock, case)) == 2 and leaked(mock, case) == []
    assert refused.status_code == 407  # provider hosts always need the token


def test_proxy_authorization_is_redacted_in_saved_flows(start_proxy, mock: MockProvider,
                                                        tmp_path: Path) -> None:
    flows = tmp_path / "flows.mitm"
    proxy = start_proxy(tokens=FORWARD_TOKENS, options=("connection_strategy=lazy", f"save_stream_file={flows}"))
    trust = ssl.create_default_context(cafile=proxy.ca_cert)
    with httpx.Client(proxy=f"http://m:{FORWARD}@127.0.0.1:{proxy.port}", verify=trust) as client:
        assert client.get(f"http://127.0.0.1:{mock.port}/openai/v1/models").status_code == 200
        assert client.get("https://api.openai.com/v1/models",
                          headers={"authorization": f"Bearer {CLIENT_KEY}"}).status_code == 200
    proxy.stop()
    saved = flows.read_bytes()
    assert FORWARD.encode() not in saved and base64.b64encode(f"m:{FORWARD}".encode()) not in saved
    assert CLIENT_KEY.encode() not in saved
    with flows.open("rb") as f:
        kinds = [(flow.request.method, flow.request.headers.get("proxy-authorization")) for flow in
                 io.FlowReader(f).stream()]
    assert kinds == [("GET", None), ("GET", None)]  # gone from what was forwarded (mitmproxy saves no CONNECTs)


# Found by the fuzz suite (test_e2e_fuzz.py): a Metrion token in a credential header Metrion did not consume (a
# duplicate of the key slot, the other provider's slot) or in the query string was forwarded to the provider.
STRAY_TOKENS = {
    "token then own key in authorization": (
        [("authorization", f"Bearer {APP_TOKEN}"), ("authorization", f"Bearer {CLIENT_KEY}"),
         ("x-metrion-token", PASS_TOKEN)], "",
        "the authorization header"),
    "token in x-api-key beside pass-through": (
        [("authorization", f"Bearer {CLIENT_KEY}"), ("x-api-key", APP_TOKEN), ("x-metrion-token", PASS_TOKEN)], "",
        "the x-api-key header"),
    "second token in x-api-key beside stored mode": (
        [("authorization", f"Bearer {APP_TOKEN}"), ("x-api-key", PASS_TOKEN)], "", "the x-api-key header"),
    "token in the query string": (
        [("authorization", f"Bearer {APP_TOKEN}")], f"?api_key={PASS_TOKEN}", "the URL"),
    "token as the key through the forward proxy": (
        [("authorization", f"Bearer {APP_TOKEN}"),
         ("proxy-authorization", "Basic " + base64.b64encode(f"m:{APP_TOKEN}".encode()).decode())], "",
        "the authorization header"),
}


@pytest.mark.parametrize("case", STRAY_TOKENS)
def test_a_metrion_token_metrion_does_not_consume_is_refused_not_forwarded(proxy: Proxy, mock: MockProvider,
                                                                          case: str) -> None:
    credentials, query, where = STRAY_TOKENS[case]
    marker = label()
    forward = credentials[-1][0] == "proxy-authorization"
    url = "http://api.openai.com/v1" if forward else f"{proxy.url}/api/proxy/openai/v1"
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    headers = httpx.Headers([("content-type", "application/json"), ("x-case", marker), *credentials])  # duplicates kept
    with httpx.Client(proxy=proxy.url if forward else None) as client:
        response = client.post(f"{url}/chat/completions{query}", content=body, headers=headers)
    assert received_with(mock, marker) == [] and leaked(mock, marker) == []
    assert response.status_code == 400 and response.headers["x-metrion-error"] == "metrion_token_in_request"
    assert where in response.json()["error"]["message"]


def test_readme_commands_bind_loopback() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "mitmdump -s" in line or "mitmweb -s" in line]
    assert commands and all("--listen-host 127.0.0.1" in line or "make run" in line for line in commands)
    assert "--listen-host 127.0.0.1" in (ROOT / "Makefile").read_text()


# defect 6: idle means idle


def test_a_slow_but_live_body_is_not_cut_as_silent(start_proxy) -> None:
    proxy = start_proxy(timeout=1)
    case = label()
    messages = [{"role": "user", "content": f"slow body {case}"}]
    client = openai.OpenAI(base_url=f"{proxy.url}/api/proxy/openai/v1", api_key=APP_TOKEN, max_retries=0,
                           default_headers={"x-mock-scenario": "trickle:120", "x-metrion-user": case})
    started = time.monotonic()
    answer = client.chat.completions.create(model="gpt-4o", messages=messages, timeout=20)
    assert time.monotonic() - started > 2  # well past the 1 s timeout, yet never silent for 1 s
    assert answer.choices[0].message.content == reply_text({"messages": messages})
    (row,) = proxy.rows("requester = ?", (case,))
    assert row["status"] == 200 and row["error"] is None and row["usage_source"] == "provider"


# defect 7: no secret at rest


def test_credential_query_parameters_are_redacted_in_the_row_and_flows(start_proxy, mock: MockProvider,
                                                                         tmp_path: Path) -> None:
    flows = tmp_path / "flows.mitm"
    proxy = start_proxy(options=("connection_strategy=lazy", f"save_stream_file={flows}"))
    case = label()
    query = f"key={GEMINI_KEY}&api_key={GEMINI_KEY}x&access_token={GEMINI_KEY}y&alt=json"
    response = httpx.get(f"{proxy.url}/api/proxy/openai/v1/models?{query}", headers={
        "authorization": f"Bearer {CLIENT_KEY}", "x-metrion-token": PASS_TOKEN, "x-metrion-user": case,
        "x-case": case})
    assert response.status_code == 200
    (received,) = received_with(mock, case)
    assert received.query == query  # the provider still gets what it was sent (only Gemini's ?key= is lifted)
    (row,) = proxy.rows("requester = ?", (case,))
    assert row["path"] == ("/api/proxy/openai/v1/models"
                           "?key=[redacted]&api_key=[redacted]&access_token=[redacted]&alt=json")
    proxy.stop()
    assert GEMINI_KEY.encode() not in flows.read_bytes()
    assert GEMINI_KEY.encode() not in proxy.db_path.read_bytes() + proxy.log_path.read_bytes()


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_provider_errors_quoting_the_callers_key_are_scrubbed_before_storing(proxy: Proxy, mock: MockProvider,
                                                                             provider: str) -> None:
    case = label()
    path = "/api/proxy/v1/messages" if provider == "anthropic" else f"/api/proxy/{provider}/v1/chat/completions"
    body = {"model": MODELS[provider], "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for key, headers in ((CLIENT_KEY, {"x-metrion-token": PASS_TOKEN, "authorization": f"Bearer {CLIENT_KEY}",
                                       "x-api-key": CLIENT_KEY}),
                         (STORED_KEYS[provider], {"authorization": f"Bearer {APP_TOKEN}"})):
        response = httpx.post(proxy.url + path, json=body, headers={
            **headers, "x-metrion-user": case, "x-mock-scenario": "echo-key"})
        assert response.status_code == 401 and key in response.text  # the caller sees the provider's answer
    rows = proxy.rows("requester = ?", (case,), n=2)
    assert len(rows) == 2
    for row in rows:
        assert "Incorrect API key provided: [redacted]" in row["error"]
    stored = proxy.db_path.read_bytes() + proxy.db_path.with_name("metrion.db-wal").read_bytes()
    for key in (CLIENT_KEY, STORED_KEYS[provider]):
        assert key.encode() not in stored and key.encode() not in proxy.log_path.read_bytes()


# defect 8: bare mitmdump -s


def test_bare_mitmdump_serves_https_proxy_clients_with_provider_hosts_unreachable(start_proxy, mock: MockProvider,
                                                                                   monkeypatch) -> None:
    proxy = start_proxy(options=(), tokens=FORWARD_TOKENS)  # no connection_strategy: mitmproxy's default
    with pytest.raises(OSError):  # as in the test environment: the real host cannot be reached
        socket.create_connection(("api.openai.com", 443), timeout=2).close()
    monkeypatch.setenv("HTTPS_PROXY", f"http://m:{FORWARD}@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_cert))
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    messages = [{"role": "user", "content": "bare mitmdump"}]
    gpt = openai.OpenAI(api_key=CLIENT_KEY, max_retries=0)
    answer = gpt.chat.completions.create(model="gpt-4o", messages=messages, timeout=10)
    assert answer.choices[0].message.content == reply_text({"messages": messages})


# defect 9: a bad config


@pytest.mark.parametrize(("config", "line"), [
    ("timeout: -1\n", "config.yaml: timeout: Input should be greater than 0"),
    ("tokens:\n  - {name: a, token: nope}\n", "config.yaml: tokens[0].token: malformed token"),
    ("rate_limit: [\n", "config.yaml: line 2: not valid YAML"),
    ("block_other_hosts: maybe\n", "config.yaml: block_other_hosts: Input should be a valid boolean"),
])
def test_a_bad_config_prints_one_line_and_exits_before_listening(tmp_path: Path, config: str, line: str) -> None:
    (tmp_path / "config.yaml").write_text(config)
    port = free_port()
    done = subprocess.run(
        [str(MITMDUMP), "-s", str(ROOT / "metrion_addon" / "addon.py"), "--set", "metrion_config=config.yaml",
         "--set", f"confdir={tmp_path / 'confdir'}", "--listen-host", "127.0.0.1", "--listen-port", str(port)],
        cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert done.stderr.splitlines() == [done.stderr.strip()] and line in done.stderr, done.stderr
    assert "listening" not in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr

