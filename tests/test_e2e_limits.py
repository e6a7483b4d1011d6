"""Limits, timeouts and upstream failures through a real mitmdump, as the official SDKs experience them.

Clock-sensitive cases freeze the proxy's clock with METRION_CLOCK_FILE instead of asserting on timings.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from harness import APP_TOKEN, Proxy, free_port, token
from test_e2e_metering import ask, label, request_for

from metrion_addon.mock_provider import MockProvider

TINY = token(7)


def tiny_plan(cap: int) -> dict:
    return {
        "plans": {"tiny": {"monthly_requests": cap}, "pro": {"monthly_requests": None}},
        "tokens": [{"name": "tiny", "token": TINY, "plan": "tiny", "keys": {"openai": "k", "anthropic": "k"}}],
    }


def frozen_clock(path: Path, when: str) -> dict[str, str]:
    path.write_text(when)
    return {"METRION_CLOCK_FILE": str(path)}


def post(proxy: Proxy, key: str = TINY, provider: str = "openai", **headers: str) -> httpx.Response:
    path, body, _ = request_for(provider, stream=False)
    auth = {"x-api-key": key} if provider == "anthropic" else {"authorization": f"Bearer {key}"}
    return httpx.post(f"{proxy.url}{path}", json=body, headers={**auth, **headers}, timeout=30)


def test_burst_over_the_rate_limit_gets_429_and_the_sdk_retry_succeeds(start_proxy, tmp_path: Path) -> None:
    clock = tmp_path / "now"  # frozen: nothing refills until the test moves it
    proxy = start_proxy(env=frozen_clock(clock, "2026-11-10T12:00:00Z"), rate_limit=100, **tiny_plan(10_000))
    passed = 0
    with httpx.Client(timeout=10) as client:
        path, body, _ = request_for("openai", stream=False)
        for _ in range(200):
            response = client.post(f"{proxy.url}{path}", json=body, headers={"authorization": f"Bearer {TINY}"})
            if response.status_code == 429:
                break
            passed += 1
    assert passed == 100  # the whole burst capacity, no more
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= 1 and 0 < int(response.headers["retry-after-ms"]) <= 600
    assert response.json()["error"]["type"] == "rate_limit_exceeded"
    assert response.headers["x-metrion-ratelimit-remaining"] == "0"

    who = label()

    def second_passes_once_refused() -> None:  # the SDK waits retry-after-ms; meanwhile a second goes by
        proxy.rows("requester = ? AND status = 429", (who,), n=1, timeout=30)
        clock.write_text("2026-11-10T12:00:01Z")

    mover = threading.Thread(target=second_passes_once_refused)
    mover.start()
    client = openai.OpenAI(base_url=f"{proxy.url}/api/proxy/openai/v1", api_key=TINY, max_retries=4,
                           default_headers={"x-metrion-user": who})
    assert ask(client, "openai", "after the wait", stream=False).startswith("Echo")  # retried after retry-after-ms
    mover.join()
    statuses = [r["status"] for r in proxy.rows("requester = ?", (who,), n=2)]
    assert statuses[0] == 429 and statuses[-1] == 200


def test_rate_limit_answers_in_each_providers_shape(start_proxy, tmp_path: Path) -> None:
    proxy = start_proxy(env=frozen_clock(tmp_path / "now", "2026-11-10T12:00:00Z"), rate_limit=1, **tiny_plan(100))
    assert post(proxy).status_code == 200
    claude = anthropic.Anthropic(base_url=f"{proxy.url}/api/proxy", api_key=TINY, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as caught:
        ask(claude, "anthropic", "too fast", stream=False)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert caught.value.response.headers["retry-after-ms"] == "60000"
    gpt = openai.OpenAI(base_url=f"{proxy.url}/api/proxy/openai/v1", api_key=TINY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught_openai:
        ask(gpt, "openai", "too fast", stream=False)
    assert caught_openai.value.code == "rate_limit_exceeded"


def test_concurrent_burst_admits_exactly_the_bucket(start_proxy, tmp_path: Path) -> None:
    proxy = start_proxy(env=frozen_clock(tmp_path / "now", "2026-11-10T12:00:00Z"), rate_limit=100,
                        **tiny_plan(10_000))
    path, body, _ = request_for("openai", stream=False)

    auth = {"authorization": f"Bearer {TINY}"}

    async def one(client: httpx.AsyncClient) -> int:
        for _ in range(3):  # 300 connects at once can overflow the listen backlog: that connection never got in
            try:
                response = await client.post(f"{proxy.url}{path}", json=body, headers=auth)
            except httpx.TransportError:
                continue
            return response.status_code
        return 0

    async def burst() -> list[int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=300), timeout=60) as client:
            return list(await asyncio.gather(*[one(client) for _ in range(300)]))

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 100 and statuses.count(429) == 200


def test_rate_bucket_survives_a_restart(start_proxy, tmp_path: Path) -> None:
    proxy = start_proxy(env=frozen_clock(tmp_path / "now", "2026-11-10T12:00:00Z"), rate_limit=3, **tiny_plan(100))
    assert [post(proxy).status_code for _ in range(3)] == [200, 200, 200]
    proxy.restart()
    assert post(proxy).status_code == 429  # no fresh burst after a restart


def test_monthly_cap_rejects_request_n_plus_1_and_survives_a_restart(start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy(**tiny_plan(3))
    assert [post(proxy).status_code for _ in range(2)] == [200, 200]
    proxy.restart()
    assert post(proxy).status_code == 200
    before = len(mock.received)
    response = post(proxy)
    assert response.status_code == 429 and len(mock.received) == before
    assert response.headers["x-should-retry"] == "false"
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"]["code"] == "monthly_quota_exceeded"

    client = openai.OpenAI(base_url=f"{proxy.url}/api/proxy/openai/v1", api_key=TINY, max_retries=2)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError, match="Monthly request cap"):
        ask(client, "openai", "over the cap", stream=False)
    assert time.monotonic() - started < 2  # failed fast: no retries
    rejected = proxy.rows("status = 429", n=2)
    assert len(rejected) == 2 and all(r["token_name"] == "tiny" for r in rejected)


def test_month_rollover_reopens_the_cap(start_proxy, tmp_path: Path) -> None:
    clock = tmp_path / "now"
    proxy = start_proxy(env=frozen_clock(clock, "2026-11-30T23:59:58Z"), **tiny_plan(2))
    assert [post(proxy).status_code for _ in range(3)] == [200, 200, 429]
    resets = post(proxy)
    assert resets.headers["retry-after"] == "2"
    clock.write_text("2026-12-01T00:00:00Z")
    time.sleep(0.01)
    response = post(proxy)
    assert response.status_code == 200
    assert response.headers["x-metrion-quota-remaining"] == "1"


def test_forwarded_responses_carry_limit_headers_and_keep_the_providers(proxy: Proxy) -> None:
    response = post(proxy, APP_TOKEN, provider="anthropic")
    assert response.headers["x-metrion-ratelimit-limit"] == "1000"
    assert int(response.headers["x-metrion-ratelimit-remaining"]) < 1000
    assert "request-id" in response.headers  # the provider's own header is untouched
    assert "x-metrion-quota-limit" not in response.headers  # pro plan: no cap


def test_slow_upstream_gets_504_in_the_providers_shape(start_proxy) -> None:
    proxy = start_proxy(timeout=1)
    started = time.monotonic()
    response = post(proxy, APP_TOKEN, provider="anthropic", **{"x-mock-scenario": "slow-headers:5"})
    assert response.status_code == 504 and time.monotonic() - started < 4
    assert response.headers.get_list("x-metrion-ratelimit-limit") == ["1000"]  # once, not once per hook
    assert response.json() == {"type": "error", "error": {"type": "timeout_error",
                                                          "message": "The provider did not respond within 1 s."}}
    client = openai.OpenAI(base_url=f"{proxy.url}/api/proxy/openai/v1", api_key=APP_TOKEN, max_retries=0,
                           default_headers={"x-mock-scenario": "slow-headers:5"})
    with pytest.raises(openai.InternalServerError) as caught:
        ask(client, "openai", "slow", stream=True)
    assert caught.value.status_code == 504
    rows = proxy.rows("status = 504", n=2)
    assert all("did not respond within 1 s" in r["error"] for r in rows)
    assert post(proxy, APP_TOKEN).status_code == 200  # and the proxy carries on


def test_silent_stream_is_closed_and_recorded_with_partial_usage(start_proxy) -> None:
    proxy = start_proxy(timeout=1)
    who = label()
    path, body, headers = request_for("anthropic", stream=True)
    received = b""
    with pytest.raises(httpx.HTTPError), httpx.stream(
        "POST", f"{proxy.url}{path}", json=body, timeout=10,
        headers={**headers, "x-mock-scenario": "stall-after:3", "x-metrion-user": who},
    ) as response:
        for chunk in response.iter_raw():
            received += chunk
    assert b"message_start" in received
    (row,) = proxy.rows("requester = ?", (who,))
    assert row["error"] == "upstream silent for 1 s; connection closed"
    assert row["input_tokens"] > 0 and row["usage_source"] == "estimated"


def test_dead_upstream_gets_502_in_the_providers_shape_at_once(start_proxy, mock: MockProvider) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = start_proxy(providers={**{p: mock.base_url(p) for p in ("anthropic", "gemini", "mistral", "grok")},
                                   "openai": f"{dead}/v1"})
    started = time.monotonic()
    client = openai.OpenAI(base_url=f"{proxy.url}/api/proxy/openai/v1", api_key=APP_TOKEN, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        ask(client, "openai", "anyone there?", stream=False)
    assert caught.value.status_code == 502 and time.monotonic() - started < 1
    assert caught.value.body["type"] == "server_error" and "could not reach the provider" in caught.value.message
    (row,) = proxy.rows("status = 502")
    assert row["provider"] == "openai" and row["usage_source"] == "none"


def test_upstream_reset_before_headers_gets_502(proxy: Proxy) -> None:
    response = post(proxy, APP_TOKEN, provider="anthropic", **{"x-mock-scenario": "reset"})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
