"""GET /metrion/health and /metrion/metrics on a real mitmdump: what a load balancer and Prometheus see.

The writer is made to fail for real with a SQLite trigger that aborts inserts; metrics are compared with the rows.
"""

from __future__ import annotations

import sqlite3
import time
import uuid

import httpx
from harness import APP_TOKEN, Proxy
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_metering import request_for


def samples(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{proxy.url}/metrion/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def call(proxy: Proxy, who: str, key: str = APP_TOKEN) -> httpx.Response:
    path, body, _ = request_for("openai", stream=False)
    return httpx.post(f"{proxy.url}{path}", json=body, timeout=30,
                      headers={"authorization": f"Bearer {key}", "x-metrion-user": who})


def test_health_is_200_with_the_writer_redis_version_and_backlog(start_proxy) -> None:
    proxy = start_proxy()
    response = httpx.get(f"{proxy.url}/metrion/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["writer"] == "ok" and body["redis"] == "not configured"
    assert body["database"] == "sqlite" and body["backlog"] == 0 and body["version"]


def test_health_turns_503_while_the_writer_cannot_write_and_200_when_it_can_again(start_proxy) -> None:
    proxy = start_proxy()
    assert call(proxy, "warm").status_code == 200
    proxy.rows(n=1)
    blocker = sqlite3.connect(proxy.db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another program holds the database: writes fail after busy_timeout (5 s)
    call(proxy, "fails to write")
    deadline = time.monotonic() + 20
    while (response := httpx.get(f"{proxy.url}/metrion/health", timeout=10)).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert response.json()["writer"].startswith("failing: ") and response.json()["backlog"] >= 1
    blocker.execute("ROLLBACK")
    blocker.close()
    deadline = time.monotonic() + 10
    while (response := httpx.get(f"{proxy.url}/metrion/health", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert response.json()["backlog"] == 0


def test_health_turns_503_when_redis_is_gone_and_on_failure_is_closed(start_proxy, start_redis) -> None:
    server = start_redis()
    proxy = start_proxy(shared={"redis": server.url})
    assert httpx.get(f"{proxy.url}/metrion/health", timeout=10).json()["redis"] == "ok"
    server.kill()
    call(proxy, "redis gone")  # the first failed round trip tells the instance
    response = httpx.get(f"{proxy.url}/metrion/health", timeout=10)
    assert response.status_code == 503 and response.json()["redis"].startswith("unreachable: ")


def test_metrics_match_the_rows_and_count_refusals_by_kind(start_proxy) -> None:
    proxy = start_proxy()
    who = f"metrics {uuid.uuid4()}"
    assert [call(proxy, who).status_code for _ in range(3)] == [200, 200, 200]
    assert call(proxy, who, key="sk-metrion-" + "f" * 32).status_code == 401
    rows = proxy.rows(n=4)
    deadline = time.monotonic() + 10
    while sum(v for (name, _), v in samples(proxy).items() if name == "metrion_requests_total") < len(rows):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    found = samples(proxy)
    for row in rows:
        labels = (("model", row["model"] or ""), ("provider", row["provider"]), ("status", str(row["status"])),
                  ("token", row["token_name"] or ""))
        expected = sum(1 for r in rows if (r["model"], r["status"], r["token_name"])
                       == (row["model"], row["status"], row["token_name"]))
        assert found[("metrion_requests_total", labels)] == expected
    ok = [r for r in rows if r["status"] == 200]
    tokens = (("kind", "input"), ("model", ok[0]["model"]), ("provider", "openai"), ("token", "app"))
    assert found[("metrion_tokens_total", tokens)] == sum(r["input_tokens"] for r in ok)
    cost = (("model", ok[0]["model"]), ("provider", "openai"), ("token", "app"))
    assert abs(found[("metrion_cost_usd_total", cost)] - sum(r["cost_usd"] for r in ok)) < 1e-12
    assert found[("metrion_request_duration_seconds_count", (("provider", "openai"),))] == len(rows)
    assert found[("metrion_time_to_first_byte_seconds_count", (("provider", "openai"),))] == len(ok)
    assert found[("metrion_rejections_total", (("kind", "invalid_metrion_token"),))] == 1
    assert found[("metrion_writer_backlog_rows", ())] == 0
