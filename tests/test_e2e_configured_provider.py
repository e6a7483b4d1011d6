"""An OpenAI-compatible provider added in the config (here Groq, on the mock) works like a built-in one: routes,
both auth modes, HTTPS_PROXY recognition, usage, limits, errors and genai-prices pricing under its own id."""

from __future__ import annotations

import json

import genai_prices
import openai
import pytest
from harness import APP_TOKEN, CLIENT_KEY, PASS_TOKEN, Proxy, token
from test_e2e_forward_proxy import proxied
from test_e2e_metering import label

from metrion_addon.mock_provider import MockProvider, expected_usage, reply_text

MODEL = "llama-3.1-8b-instant"
CAPPED = token(31)
GROQ_KEY = "gsk-stored-groq-key"


@pytest.fixture(scope="module")
def groq_proxy(mock: MockProvider, tmp_path_factory: pytest.TempPathFactory):
    from harness import base_config

    workdir = tmp_path_factory.mktemp("configured")
    config = base_config(mock.base_url, workdir / "metrion.db")
    config["providers"]["groq"] = {"url": mock.base_url("groq"), "format": "openai"}
    config["providers"]["local"] = {"url": mock.base_url("openai"), "format": "openai", "price_as": None}
    config["tokens"][0]["keys"].update(groq=GROQ_KEY, local="sk-local")
    config["plans"]["capped"] = {"monthly_requests": 1}
    config["tokens"].append({"name": "capped", "token": CAPPED, "plan": "capped", "keys": {"groq": GROQ_KEY}})
    running = Proxy(workdir, config).start()
    yield running
    running.stop()


def groq(proxy: Proxy, who: str, mode: str = "stored", name: str = "groq") -> openai.OpenAI:
    headers = {"x-metrion-user": who}
    if mode == "pass-through":
        headers["x-metrion-token"] = PASS_TOKEN
    return openai.OpenAI(base_url=f"{proxy.url}/api/proxy/{name}/v1", max_retries=0, default_headers=headers,
                         api_key=APP_TOKEN if mode == "stored" else CLIENT_KEY)


def priced(usage: dict) -> float:
    billed = genai_prices.Usage(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"])
    return float(genai_prices.calc_price(billed, MODEL, provider_id="groq").total_price)


@pytest.mark.parametrize("mode", ["stored", "pass-through"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_configured_provider_is_routed_metered_and_priced_under_its_genai_prices_id(
    groq_proxy: Proxy, mock: MockProvider, stream: bool, mode: str
) -> None:
    who = label()
    messages = [{"role": "user", "content": f"groq {who}"}]
    client = groq(groq_proxy, who, mode)
    if stream:
        chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content
    assert text == reply_text({"messages": messages})

    usage = expected_usage("groq", "chat/completions", {"model": MODEL, "messages": messages})
    (row,) = groq_proxy.rows("requester = ?", (who,))
    assert (row["provider"], row["model"], row["status"], row["error"], row["usage_source"]) == (
        "groq", MODEL, 200, None, "provider")
    assert (row["input_tokens"], row["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert row["cost_usd"] == pytest.approx(priced(usage), rel=1e-9) and row["cost_usd"] > 0
    assert row["path"] == "/api/proxy/groq/v1/chat/completions" and row["auth_mode"] == mode
    (sent,) = [r for r in mock.received if who.encode() in r.body]
    assert sent.path == "/groq/openai/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {GROQ_KEY if mode == 'stored' else CLIENT_KEY}"
    assert ("stream_options" in json.loads(sent.body)) is stream  # Groq takes include_usage: asked, then hidden


def test_provider_without_price_id_or_include_usage_is_estimated_and_unpriced(groq_proxy: Proxy, mock) -> None:
    who = label()
    chunks = groq(groq_proxy, who, name="local").chat.completions.create(
        model="my-local-model", messages=[{"role": "user", "content": f"local {who}"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("Echo: local")
    (sent,) = [r for r in mock.received if who.encode() in r.body]
    assert "stream_options" not in json.loads(sent.body)  # include_usage is off: the body is untouched
    (row,) = groq_proxy.rows("requester = ?", (who,))
    assert (row["provider"], row["usage_source"], row["cost_usd"], row["error"]) == ("local", "estimated", None, None)


def test_configured_provider_host_is_recognised_through_https_proxy(
    groq_proxy: Proxy, mock: MockProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxied(monkeypatch, groq_proxy, password=PASS_TOKEN)
    who = label()
    client = openai.OpenAI(base_url="https://api.groq.com/openai/v1", api_key=CLIENT_KEY, max_retries=0,
                           default_headers={"x-metrion-user": who})
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"tunnel {who}"}])
    assert answer.choices[0].message.content.startswith("Echo: tunnel")
    (row,) = groq_proxy.rows("requester = ?", (who,))
    assert (row["provider"], row["auth_mode"], row["path"], row["usage_source"]) == (
        "groq", "forward", "/openai/v1/chat/completions", "provider")
    (sent,) = [r for r in mock.received if who.encode() in r.body]
    assert sent.headers["authorization"] == f"Bearer {CLIENT_KEY}" and "proxy-authorization" not in sent.headers


def test_configured_provider_gets_limits_and_errors_in_openai_shape(groq_proxy: Proxy) -> None:
    who = label()
    capped = openai.OpenAI(base_url=f"{groq_proxy.url}/api/proxy/groq/v1", api_key=CAPPED, max_retries=0,
                           default_headers={"x-metrion-user": who})
    messages = [{"role": "user", "content": "hi"}]
    capped.chat.completions.create(model=MODEL, messages=messages)
    with pytest.raises(openai.RateLimitError):
        capped.chat.completions.create(model=MODEL, messages=messages)
    unknown = openai.OpenAI(base_url=f"{groq_proxy.url}/api/proxy/groq/v1", api_key="sk-metrion-" + "7" * 32,
                            max_retries=0, default_headers={"x-metrion-user": who})
    with pytest.raises(openai.AuthenticationError):
        unknown.chat.completions.create(model=MODEL, messages=messages)
    with pytest.raises(openai.RateLimitError):  # the provider's own error passes through and is logged
        groq(groq_proxy, who).chat.completions.create(model=MODEL, messages=messages,
                                                       extra_headers={"x-mock-scenario": "error-429"})
    rows = groq_proxy.rows("requester = ?", (who,), n=4)
    assert [(r["provider"], r["status"]) for r in rows] == [("groq", 200), ("groq", 429), ("groq", 401),
                                                            ("groq", 429)]
