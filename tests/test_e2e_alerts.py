"""Alerts end to end: a real mitmdump, a local webhook receiver and a real SMTP server; the clock moved by file.

A price override makes each request cost exactly $3, so the thresholds are crossed at known requests.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from harness import APP_TOKEN, Proxy
from receivers import MailReceiver, WebhookReceiver, wait_for

from metrion_addon.cli import main

CHAT = "/api/proxy/openai/v1/chat/completions"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}  # "Echo: hi 😀": 3 output tokens
DOLLAR_PER_OUTPUT_TOKEN = {"gpt-4o": {"input": 0, "output": 1_000_000}}
QUIET = 3.0  # seconds: three evaluation rounds (check_every: 1s) plus the writer's batching


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def mail() -> Iterator[MailReceiver]:
    receiver = MailReceiver().start()
    yield receiver
    receiver.stop()


def alerts_config(webhook_url: str, mail_port: int, **rule: object) -> dict:
    return {
        "smtp": {"host": "127.0.0.1", "port": mail_port, "starttls": False, "from": "metrion@example.com"},
        "channels": {"ops": {"webhook": webhook_url}, "finance": {"email": ["finance@example.com"]}},
        "rules": [{"name": "monthly-spend", "type": "budget", "threshold": 30, "unit": "usd", "period": "month",
                   "providers": ["openai"], "tokens": ["app"], "notify": ["ops", "finance"], **rule}],
        "check_every": "1s",
    }


def spend(proxy: Proxy, requests: int) -> None:
    with httpx.Client(timeout=30) as client:
        for _ in range(requests):
            response = client.post(f"{proxy.url}{CHAT}", json=BODY, headers={"authorization": f"Bearer {APP_TOKEN}"})
            assert response.status_code == 200


def levels(webhook: WebhookReceiver, mail: MailReceiver) -> tuple[list[str], list[str]]:
    return ([body["level"] for body in webhook.received],
            [message["Subject"].split()[1].lower() for message in mail.messages])


def settle(webhook: WebhookReceiver, mail: MailReceiver, expected: list[str]) -> None:
    """Wait for both channels to have received exactly `expected`, then make sure nothing more arrives."""
    assert wait_for(lambda: levels(webhook, mail) == (expected, expected)), levels(webhook, mail)
    time.sleep(QUIET)
    assert levels(webhook, mail) == (expected, expected)


def cli(proxy: Proxy, *args: str) -> list[dict]:
    result = CliRunner().invoke(main, [*args, "--config", str(proxy.workdir / "config.yaml"), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_thresholds_notify_once_per_level_until_the_cooldown_or_the_next_month(
    start_proxy, webhook: WebhookReceiver, mail: MailReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = tmp_path / "now"
    clock.write_text("2026-11-10T12:00:00Z")
    proxy = start_proxy(env={"METRION_CLOCK_FILE": str(clock)}, prices=DOLLAR_PER_OUTPUT_TOKEN,
                        alerts=alerts_config(webhook.url, mail.port))
    spend(proxy, 8)  # $24: 80 %
    time.sleep(QUIET)
    assert levels(webhook, mail) == ([], [])
    spend(proxy, 1)  # $27: 90 %
    settle(webhook, mail, ["warning"])
    spend(proxy, 1)  # $30: 100 %
    settle(webhook, mail, ["warning", "alert"])
    spend(proxy, 3)  # more traffic within the cooldown: nothing
    settle(webhook, mail, ["warning", "alert"])

    alert = webhook.received[1]
    assert alert["rule"] == "monthly-spend" and alert["type"] == "budget" and alert["value"] == 30.0
    assert alert["threshold"] == 30.0 and alert["unit"] == "usd" and alert["test"] is False
    assert alert["period"]["start"] == "2026-11-01T00:00:00.000Z" and alert["period"]["end"].startswith("2026-12-01")
    assert alert["scope"] == {"providers": ["openai"], "tokens": ["app"]}
    assert alert["text"].startswith("Metrion ALERT: rule monthly-spend (budget) is at $30.00, 100% of the threshold")
    with sqlite3.connect(proxy.db_path) as conn:
        events = conn.execute("SELECT level, channel, kind, delivered, test FROM alert_events ORDER BY id").fetchall()
    assert sorted(events) == sorted([("warning", "ops", "webhook", 1, 0), ("warning", "finance", "email", 1, 0),
                                     ("alert", "ops", "webhook", 1, 0), ("alert", "finance", "email", 1, 0)])
    monkeypatch.setenv("METRION_CLOCK_FILE", str(clock))
    (status,) = cli(proxy, "alerts", "status")
    assert status["level"] == "alert" and status["value"] == 39.0 and status["last_level"] == "alert"

    clock.write_text("2026-11-11T12:00:01Z")  # past the 24 h cooldown: the alert is repeated once
    spend(proxy, 1)
    settle(webhook, mail, ["warning", "alert", "alert"])

    clock.write_text("2026-12-01T00:00:00Z")  # a new month re-arms both levels, cooldown or not
    spend(proxy, 8)
    time.sleep(QUIET)
    assert levels(webhook, mail) == (["warning", "alert", "alert"],) * 2
    spend(proxy, 1)
    settle(webhook, mail, ["warning", "alert", "alert", "warning"])
    spend(proxy, 1)
    settle(webhook, mail, ["warning", "alert", "alert", "warning", "alert"])
    assert webhook.received[-1]["period"]["start"] == "2026-12-01T00:00:00.000Z"

    rows = cli(proxy, "alerts", "test", "monthly-spend")
    assert [(row["channel"], row["delivered"]) for row in rows] == [("ops", True), ("finance", True)]
    assert wait_for(lambda: len(mail.messages) == 6)
    assert webhook.received[-1]["test"] is True and webhook.received[-1]["text"].startswith("[TEST]")
    assert mail.messages[-1]["Subject"].startswith("[Metrion] TEST monthly-spend")


def test_a_dead_webhook_is_retried_recorded_as_failed_and_never_slows_the_proxy(
    start_proxy, mail: MailReceiver
) -> None:
    dead = WebhookReceiver("hang", hang_seconds=30).start()
    try:
        config = alerts_config(dead.url, mail.port, type="request_volume", unit="requests", threshold=1,
                               providers=None, tokens=None)
        proxy = start_proxy(alerts={**config, "webhook_timeout": "2s", "retries": 2})
        spend(proxy, 3)  # warm up
        before = timed_requests(proxy, 10)
        spend(proxy, 1)  # the monitor notices: the webhook now hangs for 3 attempts of 2 s (+ 0.5 s, 1 s backoff)
        assert wait_for(lambda: dead.attempts >= 1)
        during = timed_requests(proxy, 10)
        assert dead.attempts <= 2  # still retrying while the proxy answered
        assert max(during) < 1.0  # a blocked proxy would have waited for the 2 s webhook timeout
        assert statistics.median(during) < statistics.median(before) * 3 + 0.05
        assert wait_for(lambda: failed_events(proxy), timeout=20)
        (event,) = failed_events(proxy)
        assert event["channel"] == "ops" and event["attempts"] == 3 and "timed out" in event["error"]
        assert dead.attempts == 3
        assert wait_for(lambda: mail.messages)  # the email channel was not held up by the dead webhook
        assert "alert request-volume" not in proxy.log_path.read_text()
        assert "alert monthly-spend alert -> ops (webhook): FAILED after 3 attempt(s)" in proxy.log_path.read_text()
    finally:
        dead.stop()


def timed_requests(proxy: Proxy, n: int) -> list[float]:
    took = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            started = time.monotonic()
            response = client.post(f"{proxy.url}{CHAT}", json=BODY, headers={"authorization": f"Bearer {APP_TOKEN}"})
            took.append(time.monotonic() - started)
            assert response.status_code == 200
    return took


def failed_events(proxy: Proxy) -> list[dict]:
    with sqlite3.connect(proxy.db_path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM alert_events WHERE NOT delivered")]
