"""The dashboard shows each token's dollar budget (spent, reserved, left) and each alert rule's state."""

from __future__ import annotations

import html
from datetime import UTC, datetime

import pytest
import yaml
from starlette.testclient import TestClient

from metrion_addon import store
from metrion_addon.budgets import NANO
from metrion_addon.config import load_config
from metrion_addon.dashboard.app import create_app

NOW = datetime(2026, 11, 20, 12, 30, tzinfo=UTC)


def record(ts: str, cost: float) -> store.RequestRecord:
    return store.RequestRecord(ts=ts, token_name="app", requester=None, provider="openai", model="gpt-4o", path="/",
                               method="POST", stream=False, status=200, latency_ms=120.0, ttfb_ms=60.0,
                               cost_usd=cost, price_source="test")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    tmp_path = tmp_path_factory.mktemp("dash-budgets")
    conn = store.connect(tmp_path / "m.db")
    store.create_schema(conn)
    event = store.AlertEvent(ts="2026-11-20T11:00:00.000Z", rule="spend", level="warning", channel="ops",
                             kind="webhook", value=4.6, threshold=5.0, unit="usd",
                             period_start="2026-11-01T00:00:00.000Z", period_end="2026-12-01T00:00:00.000Z",
                             delivered=True, attempts=1, error=None, test=False)
    store.SQLiteBackend(conn).write(
        [record("2026-11-20T10:00:00.000Z", 3.0), record("2026-11-20T12:00:00.000Z", 2.2)],
        [store.BudgetState("app", "2026-11", int(5.2 * NANO), int(0.3 * NANO), 9),
         store.MonthlyCount("app", "2026-11", 2), event])
    conn.close()
    config = {
        "database": str(tmp_path / "m.db"),
        "plans": {"free": {"monthly_requests": 100, "monthly_usd": 10}},
        "tokens": [{"name": "app", "token": "sk-metrion-" + "e" * 32, "plan": "free"}],
        "alerts": {"channels": {"ops": {"webhook": "http://127.0.0.1:9/hook"}},
                   "rules": [{"name": "spend", "type": "budget", "threshold": 5, "unit": "usd", "notify": ["ops"]},
                             {"name": "slow", "type": "latency_p95", "threshold": 1000, "unit": "ms", "period": "1h",
                              "notify": ["ops"]}]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return TestClient(create_app(load_config(path), clock=NOW.timestamp))


def test_tokens_page_shows_the_budget_spent_reserved_and_left(client: TestClient) -> None:
    (app,) = client.get("/api/tokens").json()["data"]
    assert app["budget_usd"] == 10.0 and app["spent_usd"] == pytest.approx(5.2)
    assert app["reserved_usd"] == pytest.approx(0.3) and app["remaining_usd"] == pytest.approx(4.5)
    page = html.unescape(client.get("/tokens").text)
    assert "$5.20 spent, $0.3000 reserved of $10.00" in page and "$4.50" in page


def test_alerts_page_shows_each_rule_its_value_level_and_last_notification(client: TestClient) -> None:
    rows = {row["rule"]: row for row in client.get("/api/alerts").json()["data"]}
    assert rows["spend"]["value"] == pytest.approx(5.2) and rows["spend"]["level"] == "alert"
    assert rows["spend"]["last_notified"] == "2026-11-20T11:00:00.000Z" and rows["spend"]["last_level"] == "warning"
    assert rows["slow"]["value"] == 120.0 and rows["slow"]["level"] == "ok" and rows["slow"]["last_notified"] is None
    page = html.unescape(client.get("/alerts").text)
    assert "spend" in page and "$5.20" in page and "2026-11-20 11:00:00 (warning)" in page and "never" in page
