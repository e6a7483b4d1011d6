"""Alert rules without a proxy: periods, levels, cooldowns, what each type measures, and delivery to real receivers."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from receivers import MailReceiver, WebhookReceiver, wait_for

from metrion_addon import store
from metrion_addon.aggregates import NANO, USAGE_SUMS
from metrion_addon.alerts import Measurement, Notified, due, level_of, measure, payload, value_of
from metrion_addon.config import AlertChannel, AlertRule, AlertSettings, ConfigError, SMTPSettings, load_config
from metrion_addon.notify import AlertMonitor, deliver, email_message, last_notified, post_webhook
from metrion_addon.periods import Period, parse_duration, parse_period


def at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def rule(**fields: object) -> AlertRule:
    base: dict = {"name": "spend", "type": "budget", "threshold": 10, "unit": "usd", "notify": ["ops"]}
    return AlertRule.model_validate({**base, **fields}, context={"environ": {}, "need_keys": True})


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604_800), (" 24h ", 86_400)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0h", "1w", "h", "1.5h", ""])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="duration like 15m"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("period", "now", "bounds"),
    [
        ("month", "2026-11-25T10:00:00Z", ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")),
        ("month", "2026-12-31T23:59:59Z", ("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z")),
        ("day", "2026-11-25T10:00:00Z", ("2026-11-25T00:00:00Z", "2026-11-26T00:00:00Z")),
        ("15m", "2026-11-25T10:00:00Z", ("2026-11-25T09:45:00Z", "2026-11-25T10:00:00Z")),
        ({"since": "2026-11-03"}, "2026-11-25T10:00:00Z", ("2026-11-03T00:00:00Z", "2026-11-25T10:00:00Z")),
    ],
)
def test_period_bounds(period: object, now: str, bounds: tuple[str, str]) -> None:
    assert parse_period(period).bounds(at(now)) == (at(bounds[0]), at(bounds[1]))


def test_calendar_periods_change_key_at_their_start_and_rolling_windows_never_do() -> None:
    month, window = Period("month"), parse_period("1h")
    assert month.key(at("2026-11-30T23:59:59Z")) != month.key(at("2026-12-01T00:00:00Z"))
    assert month.key(at("2026-11-02T00:00:00Z")) == month.key(at("2026-11-30T00:00:00Z"))
    assert window.key(at("2026-11-02T00:00:00Z")) is None


@pytest.mark.parametrize(("value", "level"), [(None, None), (0.0, None), (8.99, None), (9.0, "warning"),
                                              (9.99, "warning"), (10.0, "alert"), (250.0, "alert")])
def test_warning_at_90_percent_and_alert_at_100(value: float | None, level: str | None) -> None:
    assert level_of(value, 10.0) == level


DAY = 86_400.0
NOV, DEC = at("2026-11-01T00:00:00Z"), at("2026-12-01T00:00:00Z")


@pytest.mark.parametrize(
    ("last", "period", "now", "expected"),
    [
        (None, NOV, NOV + 10, True),  # never notified
        (Notified(NOV + 10, NOV), NOV, NOV + 20, False),  # same period, within the cooldown
        (Notified(NOV + 10, NOV), NOV, NOV + 10 + DAY, True),  # the cooldown has passed
        (Notified(NOV + 10, NOV), DEC, DEC + 5, True),  # a new period re-arms at once
    ],
)
def test_a_level_notifies_once_per_cooldown_and_again_in_a_new_period(
    last: Notified | None, period: float, now: float, expected: bool
) -> None:
    assert due("alert", last, period, now, DAY) is expected
    assert due(None, last, period, now, DAY) is False


def sums(requests: int = 0, cost_usd: float = 0.0) -> list[int]:
    values = [0] * len(USAGE_SUMS)
    values[USAGE_SUMS.index("requests")] = requests
    values[USAGE_SUMS.index("cost_nusd")] = int(cost_usd * NANO)
    return values


USAGE = {  # (provider, token_name, status, own): sums
    ("openai", "app", 200, 0): sums(90, 3.0),
    ("openai", "app", 500, 0): sums(6, 0.0),
    ("openai", "app", 429, 1): sums(50),  # Metrion's own refusals
    ("openai", "app", 502, 1): sums(4),  # Metrion could not reach the provider
    ("anthropic", "bot", 200, 0): sums(100, 5.5),
    ("anthropic", "bot", 400, 0): sums(10, 0.0),
}


@pytest.mark.parametrize(
    ("fields", "value"),
    [
        ({}, 8.5),
        ({"providers": ["openai"]}, 3.0),
        ({"tokens": ["bot"]}, 5.5),
        ({"type": "request_volume", "unit": "requests"}, 260.0),
        ({"type": "request_volume", "unit": "count", "providers": ["openai"]}, 150.0),
        ({"type": "error_rate", "unit": "count"}, 20.0),  # 6 + 4 + 10: Metrion's 429s are not errors here
        ({"type": "error_rate", "unit": "percent", "providers": ["openai"]}, 10.0),  # (6 + 4) / (90 + 6 + 4)
    ],
)
def test_what_each_rule_type_measures_in_its_scope(fields: dict, value: float) -> None:
    assert value_of(rule(**fields), USAGE) == pytest.approx(value)


def test_an_error_rate_without_requests_and_a_p95_without_latencies_have_no_value() -> None:
    assert value_of(rule(type="error_rate", unit="percent"), {}) is None
    assert value_of(rule(type="latency_p95", unit="ms"), {}, None) is None


def record(ts: str, **fields: object) -> store.RequestRecord:
    base: dict = {"token_name": "app", "requester": None, "provider": "openai", "model": "gpt-4o", "path": "/",
                  "method": "POST", "stream": False, "status": 200, "latency_ms": 100.0, "ttfb_ms": 50.0,
                  "cost_usd": 1.0, "price_source": "test"}
    return store.RequestRecord(ts=ts, **{**base, **fields})


def database(tmp_path: Path, records: list[store.RequestRecord]) -> sqlite3.Connection:
    conn = store.connect(tmp_path / "m.db")
    store.create_schema(conn)
    store.SQLiteBackend(conn).write(records, [])
    return conn


def test_rules_read_the_aggregates_of_their_period_only(tmp_path: Path) -> None:
    conn = database(tmp_path, [
        record("2026-10-31T23:59:59.000Z", cost_usd=100.0),  # last month
        record("2026-11-02T08:00:00.000Z", cost_usd=2.0),
        record("2026-11-25T09:15:00.000Z", cost_usd=3.0, latency_ms=900.0),
        record("2026-11-25T09:59:00.000Z", cost_usd=4.0, latency_ms=100.0, provider="anthropic"),
    ])
    now = at("2026-11-25T10:00:00Z")
    assert measure(conn, rule(), now).value == pytest.approx(9.0)
    assert measure(conn, rule(period="day"), now).value == pytest.approx(7.0)
    assert measure(conn, rule(period="30m", providers=["anthropic"]), now).value == pytest.approx(4.0)
    p95 = measure(conn, rule(type="latency_p95", unit="ms", threshold=500, period="day"), now)
    assert p95.value == 900.0 and p95.level == "alert"
    assert measure(conn, rule(threshold=9.5), now).level == "warning"


@pytest.mark.parametrize("fields", [
    {},
    {"type": "request_volume", "unit": "requests", "tokens": ["app"]},
    {"type": "error_rate", "unit": "percent", "providers": ["openai"]},
    {"type": "latency_p95", "unit": "ms", "threshold": 500},
], ids=["budget", "request_volume", "error_rate", "latency_p95"])
def test_a_month_long_rule_reads_aggregates_and_only_the_partial_hours_of_the_log(
        tmp_path: Path, fields: dict) -> None:
    conn = database(tmp_path, [record(f"2026-11-{day:02d}T{hour:02d}:30:00.000Z", cost_usd=1.0, latency_ms=100.0)
                               for day in range(1, 26) for hour in (8, 14)])
    # Whole hours and days are read from the aggregates: raw rows of past hours can go and still count
    # (a rule that scanned the log would lose them).
    with conn:
        conn.execute("DELETE FROM requests WHERE ts < '2026-11-25T00:00:00.000Z'")
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    measured = measure(conn, rule(period="month", **fields), at("2026-11-25T15:10:00Z"))
    conn.set_trace_callback(None)
    expected = {"budget": 50.0, "request_volume": 50.0, "error_rate": 0.0}.get(fields.get("type", "budget"))
    if expected is not None:
        assert measured.value == pytest.approx(expected)
    plans = [detail for sql in statements if sql.lstrip().upper().startswith(("SELECT", "WITH"))
             for *_, detail in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
    assert plans and not [detail for detail in plans if detail.startswith("SCAN") and "CONSTANT" not in detail]


def test_notifications_carry_every_field_and_a_sentence() -> None:
    chosen = rule(providers=["openai"], tokens=["app"])
    measured = Measurement("spend", 9.2, "warning", NOV, DEC, NOV)
    body = payload(chosen, measured, "warning")
    assert body["text"].startswith("Metrion WARNING: rule spend (budget) is at $9.20, 92% of the threshold of $10.00")
    assert "providers openai; tokens app" in body["text"]
    assert {k: body[k] for k in ("rule", "type", "level", "value", "threshold", "unit", "test")} == {
        "rule": "spend", "type": "budget", "level": "warning", "value": 9.2, "threshold": 10.0, "unit": "usd",
        "test": False}
    assert body["period"]["start"] == "2026-11-01T00:00:00.000Z" and body["period"]["end"] == "2026-12-01T00:00:00.000Z"
    assert body["scope"] == {"providers": ["openai"], "tokens": ["app"]}
    test = payload(chosen, measured, "test", test=True)
    assert test["text"].startswith("[TEST]") and "test notification" in test["text"]
    mail = email_message(test, "metrion@example.com", ["a@example.com"])
    assert mail["Subject"] == "[Metrion] TEST spend: $9.20 of $10.00"
    assert "threshold: $10.00" in mail.get_content()


def test_a_webhook_gets_the_json_and_a_failing_one_is_retried_then_reported() -> None:
    receiver = WebhookReceiver().start()
    failing = WebhookReceiver("fail").start()
    try:
        delivery = post_webhook(receiver.url, {"text": "hi"}, timeout=2, retries=2, sleep=lambda s: None)
        assert delivery.delivered and delivery.attempts == 1 and receiver.received == [{"text": "hi"}]
        waits: list[float] = []
        failed = post_webhook(failing.url, {"text": "hi"}, timeout=2, retries=2, sleep=waits.append)
        assert not failed.delivered and failed.attempts == 3 and failing.attempts == 3
        assert "500" in (failed.error or "") and waits == [0.5, 1.0]
    finally:
        receiver.stop()
        failing.stop()


def test_a_silent_webhook_times_out() -> None:
    hanging = WebhookReceiver("hang", hang_seconds=3).start()
    try:
        started = time.monotonic()
        delivery = post_webhook(hanging.url, {"text": "hi"}, timeout=0.3, retries=1, sleep=lambda s: None)
        assert not delivery.delivered and delivery.attempts == 2 and time.monotonic() - started < 2
        assert "timed out" in (delivery.error or "")
    finally:
        hanging.stop()


def test_email_goes_through_a_real_smtp_server_as_plain_text() -> None:
    mail = MailReceiver().start()
    try:
        settings = AlertSettings.model_validate(
            {"smtp": {"host": "127.0.0.1", "port": mail.port, "starttls": False, "from": "metrion@example.com"},
             "channels": {"finance": {"email": ["finance@example.com", "cfo@example.com"]}}},
            context={"environ": {}, "need_keys": True})
        body = payload(rule(), Measurement("spend", 10.5, "alert", NOV, DEC, NOV), "alert")
        delivery = deliver(settings.channels["finance"], settings, body)
        assert delivery.delivered
        assert wait_for(lambda: mail.messages)
        (message,) = mail.messages
        assert message["To"] == "finance@example.com, cfo@example.com" and message["From"] == "metrion@example.com"
        assert message["Subject"] == "[Metrion] ALERT spend: $10.50 of $10.00"
        assert message.get_content_type() == "text/plain"
        assert "Metrion ALERT: rule spend (budget) is at $10.50" in message.get_payload()
    finally:
        mail.stop()


def test_an_unreachable_mail_server_is_a_failed_delivery() -> None:
    smtp = SMTPSettings.model_validate({"host": "127.0.0.1", "port": 1, "starttls": False, "from": "m@example.com",
                                        "timeout": 1}, context={"environ": {}, "need_keys": True})
    settings = AlertSettings(smtp=smtp, channels={"f": AlertChannel(email=["f@example.com"])}, retries=1)
    body = payload(rule(), Measurement("spend", 10.5, "alert", NOV, DEC, NOV), "alert")
    delivery = deliver(settings.channels["f"], settings, body, sleep=lambda s: None)
    assert not delivery.delivered and delivery.attempts == 2 and delivery.error


def test_the_monitor_notifies_each_level_once_and_remembers_across_restarts(tmp_path: Path) -> None:
    receiver = WebhookReceiver().start()
    events: list[store.AlertEvent] = []
    try:
        settings = AlertSettings.model_validate(
            {"channels": {"ops": {"webhook": receiver.url}},
             "rules": [{"name": "spend", "type": "budget", "threshold": 10, "unit": "usd", "notify": ["ops"]}]},
            context={"environ": {}, "need_keys": True})
        conn = database(tmp_path, [record("2026-11-03T10:00:00.000Z", cost_usd=9.1)])
        now = at("2026-11-03T10:00:01Z")
        monitor = AlertMonitor(settings, tmp_path / "m.db", lambda: now, events.append, {})
        assert monitor.check(conn, now) == [("spend", "warning")]
        assert monitor.check(conn, now + 5) == []
        store.SQLiteBackend(conn).write([record("2026-11-03T10:00:02.000Z", cost_usd=1.0)], [])
        assert monitor.check(conn, now + 10) == [("spend", "alert")]
        assert monitor.check(conn, now + 20) == []
        assert wait_for(lambda: len(events) == 2)
        monitor.close()
        assert [body["level"] for body in receiver.received] == ["warning", "alert"]
        history = {(e.rule, e.level): e.ts for e in events}
        again = AlertMonitor(settings, tmp_path / "m.db", lambda: now, events.append, history)
        assert again.check(conn, now + 30) == []  # restarted: still within the cooldown
        assert again.check(conn, now + 10 + DAY) == [("spend", "alert")]
        again.close()
        assert last_notified(settings.rules, {("gone", "alert"): "2026-11-01T00:00:00.000Z"}) == {}
    finally:
        receiver.stop()


@pytest.mark.parametrize(
    ("alerts", "message"),
    [
        ({"rules": [{"name": "x", "type": "budget", "threshold": 1, "unit": "ms", "notify": ["ops"]}]},
         "alerts.rules[0]: unit 'ms' does not fit type budget (use usd)"),
        ({"rules": [{"name": "x", "type": "budget", "threshold": 1, "unit": "usd", "notify": ["pager"]}]},
         "alerts.rules[0].notify: unknown channel 'pager' (known: ops)"),
        ({"rules": [{"name": "x", "type": "budget", "threshold": 1, "unit": "usd", "period": "fortnight",
                     "notify": ["ops"]}]}, "alerts.rules[0].period: expected month, day, a window like 15m"),
        ({"rules": [{"name": "x", "type": "budget", "threshold": 1, "unit": "usd", "tokens": ["ghost"],
                     "notify": ["ops"]}]}, "alerts.rules[0].tokens: unknown token 'ghost'"),
        ({"rules": [{"name": "x", "type": "budget", "threshold": 0, "unit": "usd", "notify": ["ops"]}]},
         "alerts.rules[0].threshold: Input should be greater than 0"),
        ({"rules": [{"name": "x", "type": "budget", "threshold": 1, "unit": "usd", "notify": ["ops"]}] * 2},
         "alerts.rules[1].name: duplicate rule 'x'"),
        ({"channels": {"ops": {"webhook": "http://x/h"}, "f": {"email": ["f@example.com"]}}},
         "alerts.channels.f.email: needs alerts.smtp"),
        ({"channels": {"ops": {"webhook": "http://x/h", "email": ["f@example.com"]}}},
         "give exactly one of webhook: URL or email: [addresses]"),
        ({"cooldown": "soon"}, "alerts.cooldown: Value error, expected a duration like 15m"),
    ],
)
def test_bad_alert_rules_are_one_clear_line(tmp_path: Path, alerts: dict, message: str) -> None:
    config = {"tokens": [{"name": "app", "token": "sk-metrion-" + "0" * 32}],
              "alerts": {"channels": {"ops": {"webhook": "http://x/h"}}, **alerts}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert message.replace("Value error, ", "") in str(caught.value) and "\n" not in str(caught.value)
