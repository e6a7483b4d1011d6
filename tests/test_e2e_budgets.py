"""Dollar budgets through a real mitmdump: concurrent bursts never overshoot, streams settle, restarts keep counts.

Reservations are computed with the library's own bound so each test knows what one request may cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from harness import Proxy, base_config, token

from metrion_addon.budgets import NANO, token_bound, token_rates
from metrion_addon.clock import iso_utc
from metrion_addon.config import BUILTIN_PRICE_IDS
from metrion_addon.mock_provider import MockProvider, output_tokens, reply_text
from metrion_addon.pricing import Pricer, context_window
from metrion_addon.request_body import RequestBody
from metrion_addon.routes import route_metrion_path

BUDGETED = token(11)
OPEN = token(12)
CHAT = "/api/proxy/openai/v1/chat/completions"
MESSAGES = "/api/proxy/v1/messages"


def budget_config(monthly_usd: float, **token_fields: object) -> dict:
    return {
        "plans": {"metered": {"monthly_requests": None, "monthly_usd": monthly_usd}, "pro": {"monthly_requests": None}},
        "tokens": [
            {"name": "metered", "token": BUDGETED, "plan": "metered", "keys": {"openai": "k", "anthropic": "k"},
             **token_fields},
            {"name": "open", "token": OPEN, "plan": "pro", "keys": {"openai": "k"}},
        ],
    }


def chat_body(text: str = "budget me", model: str = "gpt-4o", stream: bool = False) -> bytes:
    body: dict = {"model": model, "messages": [{"role": "user", "content": text}]}
    body["max_tokens"] = output_tokens(reply_text(body))  # exactly what the mock will answer with
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def anthropic_body(text: str = "budget me") -> bytes:
    body = {"model": "claude-sonnet-4-20250514", "messages": [{"role": "user", "content": text}], "stream": True}
    body["max_tokens"] = output_tokens(reply_text(body))
    return json.dumps(body).encode()


def reservation(path: str, body: bytes) -> int:
    """Nano-USD the proxy reserves for this body: the library's bound, priced like the row."""
    route = route_metrion_path(path, {"openai": "http://u/v1", "anthropic": "http://u/v1"})
    assert route is not None
    parsed = json.loads(body)
    request = RequestBody(parsed["model"], parsed.get("stream") is True, parsed)
    window = context_window(BUILTIN_PRICE_IDS, route.provider, parsed["model"])
    bound = token_bound(route, "POST", body, request, window)
    rates = token_rates(Pricer({}), route.provider, parsed["model"], iso_utc(time.time()))
    assert rates is not None and not hasattr(bound, "reason")
    return rates.nano_usd(bound)


def headers(key: str = BUDGETED, provider: str = "openai") -> dict[str, str]:
    auth = {"x-api-key": key, "anthropic-version": "2023-06-01"} if provider == "anthropic" else {
        "authorization": f"Bearer {key}"}
    return {**auth, "content-type": "application/json"}


def budget_row(proxy: Proxy) -> dict:
    with sqlite3.connect(proxy.db_path) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM budget_usage WHERE token_name = 'metered'").fetchone()
    return dict(row) if row else {"spent_nanousd": 0, "reserved_nanousd": 0}


def forwarded_cost(proxy: Proxy) -> float:
    with sqlite3.connect(proxy.db_path) as conn:
        (total,) = conn.execute(
            "SELECT coalesce(sum(cost_usd), 0) FROM requests WHERE token_name = 'metered' AND status = 200"
        ).fetchone()
    return total


def settled(proxy: Proxy, rows: int) -> dict:
    """The stored budget once the token's first `rows` rows are written: a row and its settlement commit together."""
    proxy.rows("token_name = 'metered'", n=rows)
    return budget_row(proxy)


def test_200_concurrent_requests_never_overshoot_and_use_the_budget(start_proxy, mock: MockProvider) -> None:
    body = chat_body()
    reserve = reservation(CHAT, body)
    limit = 50 * reserve + reserve // 2  # fits 50 reservations, not 51
    proxy = start_proxy(**budget_config(limit / NANO))
    before = len(mock.received)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=200), timeout=60) as client:
            return await asyncio.gather(*[
                client.post(f"{proxy.url}{CHAT}", content=body, headers=headers()) for _ in range(200)
            ])

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 50
    assert len(mock.received) - before == statuses.count(200)  # no refused request reached the provider
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["x-should-retry"] == "false"
    assert refused.json()["error"]["code"] == "budget_exceeded"
    settled(proxy, 200)
    assert forwarded_cost(proxy) <= limit / NANO

    # Fill what the burst's reservations held back, one request at a time at full speed: a refusal waits for the
    # requests that finished to settle, so it only comes within one reservation of the limit.
    forwarded = statuses.count(200)
    with httpx.Client(timeout=30) as client:
        while (response := client.post(f"{proxy.url}{CHAT}", content=body, headers=headers())).status_code == 200:
            forwarded += 1
    assert response.status_code == 429
    proxy.rows("token_name = 'metered' AND status = 200", n=forwarded)
    spent = forwarded_cost(proxy)
    assert (limit - reserve) / NANO < spent <= limit / NANO
    stored = settled(proxy, 200 + forwarded - statuses.count(200) + 1)
    assert stored["reserved_nanousd"] == 0
    assert abs(stored["spent_nanousd"] - spent * NANO) < 500  # integer counter == sum of the rows' costs


def late_writer_proxy(mock: MockProvider, workdir: Path, **config: object) -> Proxy:
    """A proxy whose writer takes each row 20 ms late (tests/slow_settlement.py)."""
    return Proxy(workdir, base_config(mock.base_url, workdir / "metrion.db", **config),
                 scripts=(Path(__file__).parent / "slow_settlement.py",)).start()


def back_to_back(proxy: Proxy, body: bytes) -> int:
    """Send `body` at full speed, each request as soon as the previous answered, until the budget refuses one;
    how many were forwarded."""
    forwarded = 0
    with httpx.Client(timeout=30) as client:
        while (response := client.post(f"{proxy.url}{CHAT}", content=body, headers=headers())).status_code == 200:
            forwarded += 1
    assert response.json()["error"]["code"] == "budget_exceeded"
    return forwarded


def test_back_to_back_requests_are_refused_only_once_finished_ones_have_settled(
        mock: MockProvider, tmp_path_factory: pytest.TempPathFactory) -> None:
    body = chat_body("back to back")
    reserve = reservation(CHAT, body)
    limit = 20 * reserve
    proxy = late_writer_proxy(mock, tmp_path_factory.mktemp("late-settlement"), **budget_config(limit / NANO))
    try:
        forwarded = back_to_back(proxy, body)
        proxy.rows("token_name = 'metered' AND status = 200", n=forwarded)
        assert (limit - reserve) / NANO < forwarded_cost(proxy) <= limit / NANO  # not refused early
    finally:
        proxy.stop()


def test_forwarded_responses_carry_the_budget_and_refusals_fail_fast_in_each_sdk(start_proxy) -> None:
    body = chat_body()
    reserve = reservation(CHAT, body)
    proxy = start_proxy(**budget_config(1.5 * reserve / NANO))
    first = httpx.post(f"{proxy.url}{CHAT}", content=body, headers=headers(), timeout=30)
    assert first.status_code == 200
    limit = 1.5 * reserve / NANO
    assert float(first.headers["x-metrion-budget-limit-usd"]) == pytest.approx(limit, abs=1e-6)
    assert float(first.headers["x-metrion-budget-remaining-usd"]) == pytest.approx(limit - reserve / NANO, abs=2e-6)
    gpt = openai.OpenAI(base_url=f"{proxy.url}/api/proxy/openai/v1", api_key=BUDGETED, max_retries=2)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError, match="Monthly budget reached") as caught:
        gpt.chat.completions.create(**{**json.loads(body), "max_tokens": 4000})
    assert caught.value.code == "budget_exceeded" and time.monotonic() - started < 2  # not retried
    claude = anthropic.Anthropic(base_url=f"{proxy.url}/api/proxy", api_key=BUDGETED, max_retries=2)
    with pytest.raises(anthropic.RateLimitError) as refused:
        claude.messages.create(model="claude-sonnet-4-20250514", max_tokens=4000,
                               messages=[{"role": "user", "content": "too dear"}])
    assert refused.value.body["error"]["type"] == "rate_limit_error"
    assert "budget" in refused.value.message
    unbudgeted = httpx.post(f"{proxy.url}{CHAT}", content=body, headers=headers(OPEN), timeout=30)
    assert unbudgeted.status_code == 200 and "x-metrion-budget-limit-usd" not in unbudgeted.headers


def test_streams_settle_at_the_reported_cost_and_cut_streams_keep_their_reservation(start_proxy) -> None:
    proxy = start_proxy(timeout=1, **budget_config(1.0))
    body = anthropic_body()
    reserve = reservation(MESSAGES, body)
    with httpx.stream("POST", f"{proxy.url}{MESSAGES}", content=body, headers=headers(provider="anthropic"),
                      timeout=30) as response:
        assert response.status_code == 200 and b"message_stop" in response.read()
    after_stream = settled(proxy, 1)
    (row,) = proxy.rows("token_name = 'metered'")
    assert row["usage_source"] == "provider" and row["cost_usd"] > 0
    assert after_stream["spent_nanousd"] == pytest.approx(row["cost_usd"] * NANO, abs=1)
    assert after_stream["spent_nanousd"] < reserve

    # Cut after message_delta (the final usage) but before message_stop: the provider reported, so it settles.
    cut_late = {**headers(provider="anthropic"), "x-mock-scenario": "cut-after:8"}  # 3 text deltas
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", f"{proxy.url}{MESSAGES}", content=body,
                                                      headers=cut_late, timeout=30) as response:
        response.read()
    late = proxy.rows("token_name = 'metered'", n=2)[-1]
    assert late["usage_source"] == "provider" and late["error"]
    assert settled(proxy, 2)["spent_nanousd"] == pytest.approx((row["cost_usd"] + late["cost_usd"]) * NANO, abs=2)

    # Cut before any closing usage: what the provider billed is unknown, so the whole reservation stays.
    cut_early = {**headers(provider="anthropic"), "x-mock-scenario": "cut-after:3"}
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", f"{proxy.url}{MESSAGES}", content=body,
                                                      headers=cut_early, timeout=30) as response:
        response.read()
    early = proxy.rows("token_name = 'metered'", n=3)[-1]
    assert early["usage_source"] == "estimated"
    assert budget_row(proxy)["reserved_nanousd"] == reserve

    # A timeout (the provider fell silent before its usage): unknown as well, so that reservation stays too.
    stalled, stalled_body = {**headers(), "x-mock-scenario": "stall-after:2"}, chat_body(stream=True)
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", f"{proxy.url}{CHAT}", content=stalled_body,
                                                      headers=stalled, timeout=30) as response:
        response.read()
    timed_out = proxy.rows("token_name = 'metered'", n=4)[-1]
    assert "silent" in timed_out["error"] and timed_out["usage_source"] == "estimated"
    kept = budget_row(proxy)
    held = reserve + reservation(CHAT, stalled_body)
    assert kept["reserved_nanousd"] == held
    assert kept["spent_nanousd"] == after_stream["spent_nanousd"] + math_ceil_nano(late["cost_usd"])

    # A restart keeps both: what was spent, and the reservations nobody settled.
    proxy.restart()
    again = httpx.post(f"{proxy.url}{CHAT}", content=chat_body(), headers=headers(), timeout=30)
    remaining = 1.0 - (kept["spent_nanousd"] + kept["reserved_nanousd"] + reservation(CHAT, chat_body())) / NANO
    assert float(again.headers["x-metrion-budget-remaining-usd"]) == pytest.approx(remaining, abs=2e-6)
    assert settled(proxy, 5)["reserved_nanousd"] == held


def test_a_crash_right_after_forwarding_keeps_the_reservation(start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy(**budget_config(1.0))
    body = chat_body(f"crash {time.monotonic_ns()}")
    slow = {**headers(), "x-mock-scenario": "slow-headers:5"}  # the provider is still thinking when Metrion dies

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # Metrion dies mid-request
            httpx.post(f"{proxy.url}{CHAT}", content=body, headers=slow, timeout=30)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    deadline = time.monotonic() + 10
    while not any(r.body == body for r in mock.received):  # forwarded: the provider may bill it from now on
        assert time.monotonic() < deadline, "the request never reached the provider"
        time.sleep(0.001)
    assert proxy.process is not None
    proxy.process.kill()  # no clean shutdown: whatever was not on disk is lost
    proxy.process.wait()
    proxy.process = None
    sender.join(30)
    proxy.start()
    assert budget_row(proxy)["reserved_nanousd"] == reservation(CHAT, body)


def math_ceil_nano(usd: float) -> int:
    return -(-round(usd * NANO * 1000) // 1000)


def test_unpriced_models_follow_the_config(start_proxy, mock: MockProvider) -> None:
    proxy = start_proxy(**budget_config(1.0))
    before = len(mock.received)
    refused = httpx.post(f"{proxy.url}{CHAT}", content=chat_body(model="house-model-7"), headers=headers(), timeout=30)
    assert refused.status_code == 403 and len(mock.received) == before
    error = refused.json()["error"]
    assert error["code"] == "budget_unbounded" and "no price for model 'house-model-7'" in error["message"]
    assert refused.headers["x-should-retry"] == "false"

    allowing = start_proxy(**budget_config(1.0, unpriced="allow"))
    allowed = httpx.post(f"{allowing.url}{CHAT}", content=chat_body(model="house-model-7"), headers=headers(),
                         timeout=30)
    assert allowed.status_code == 200 and allowed.headers["x-metrion-budget-remaining-usd"] == "1.000000"


def test_quota_command_shows_spent_reserved_and_remaining(start_proxy, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from metrion_addon.cli import main

    proxy = start_proxy(**budget_config(2.0))
    assert httpx.post(f"{proxy.url}{CHAT}", content=chat_body(), headers=headers(), timeout=30).status_code == 200
    stored = settled(proxy, 1)
    config = proxy.workdir / "config.yaml"
    result = CliRunner().invoke(main, ["quota", "metered", "--config", str(config), "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["budget_usd"] == 2.0
    assert row["spent_usd"] == pytest.approx(stored["spent_nanousd"] / NANO, abs=1e-9)
    assert row["reserved_usd"] == 0
    assert row["remaining_usd"] == pytest.approx(2.0 - stored["spent_nanousd"] / NANO, abs=1e-9)
    table = CliRunner().invoke(main, ["quota", "metered", "--config", str(config)])
    assert "$2.00" in table.output and "metered" in table.output
