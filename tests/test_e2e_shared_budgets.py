"""Dollar budgets on one real Redis shared by several mitmdump processes: exact under load, restarts and Redis's loss.

Each instance keeps its own SQLite log; the budget lives in Redis. Reservations are the library's own bound.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import threading
import time
import uuid

import httpx
import pytest
import redis
from click.testing import CliRunner
from harness import Proxy
from receivers import wait_for
from test_e2e_budgets import (
    BUDGETED,
    CHAT,
    OPEN,
    back_to_back,
    budget_config,
    chat_body,
    headers,
    late_writer_proxy,
    reservation,
)

from metrion_addon.budgets import NANO
from metrion_addon.cli import main
from metrion_addon.mock_provider import MockProvider

MONTH = time.strftime("%Y-%m", time.gmtime())


def shared_budget_config(redis_url: str, monthly_usd: float, on_failure: str = "closed") -> dict:
    return {**budget_config(monthly_usd), "shared": {"redis": redis_url, "on_failure": on_failure}}


def burst(proxies: list[Proxy], n: int, body: bytes, key: str = BUDGETED) -> list[int]:
    """`n` concurrent requests spread round-robin over `proxies`; their statuses (0 when the connection failed)."""

    async def one(client: httpx.AsyncClient, proxy: Proxy) -> int:
        try:
            return (await client.post(f"{proxy.url}{CHAT}", content=body, headers=headers(key))).status_code
        except httpx.TransportError:
            return 0

    async def run() -> list[int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n), timeout=60) as client:
            targets = itertools.islice(itertools.cycle(proxies), n)
            return list(await asyncio.gather(*[one(client, proxy) for proxy in targets]))

    return asyncio.run(run())


def rows(proxies: list[Proxy], where: str) -> list[tuple]:
    found = []
    for proxy in proxies:
        with sqlite3.connect(proxy.db_path) as conn:
            found += conn.execute(f"SELECT status, cost_usd, usage_source FROM requests WHERE token_name = 'metered' "
                                  f"AND {where}").fetchall()
    return found


def wait_rows(proxies: list[Proxy], n: int, timeout: float = 15) -> list[tuple]:
    """The budgeted token's rows over every instance, once there are `n` (a row and its settlement go together)."""
    deadline = time.monotonic() + timeout
    while len(found := rows(proxies, "1")) < n:
        assert time.monotonic() < deadline, f"{len(found)} of {n} rows"
        time.sleep(0.05)
    return found


def redis_budget(url: str) -> dict[str, int]:
    found = redis.Redis.from_url(url).hgetall(f"metrion:budget:metered:{MONTH}")
    return {name.decode(): int(value) for name, value in found.items() if name in (b"spent", b"reserved")}


def spent_of(found: list[tuple]) -> float:
    return sum(cost for status, cost, _ in found if status == 200)


def test_budget_is_exact_across_three_instances_under_a_concurrent_burst(
    start_proxy, start_redis, mock: MockProvider
) -> None:
    body = chat_body(f"shared budget {uuid.uuid4()}")
    reserve = reservation(CHAT, body)
    limit = 20 * reserve + reserve // 2  # fits 20 reservations, not 21
    server = start_redis()
    proxies = [start_proxy(**shared_budget_config(server.url, limit / NANO)) for _ in range(3)]
    before = len(mock.received)
    statuses = burst(proxies, 100, body)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 20
    assert len(mock.received) - before == statuses.count(200)
    wait_rows(proxies, 100)

    # Fill what the burst's reservations held back, one request at a time over the instances in turn: a refusal
    # only comes within one reservation of the limit, whichever instance is asked.
    forwarded = statuses.count(200)
    for proxy in itertools.cycle(proxies):
        wait_rows(proxies, 100 + forwarded - statuses.count(200))
        status = httpx.post(f"{proxy.url}{CHAT}", content=body, headers=headers(), timeout=30).status_code
        if status == 429:
            break
        assert status == 200
        forwarded += 1
    found = wait_rows(proxies, 100 + forwarded - statuses.count(200) + 1)
    spent = spent_of(found)
    assert (limit - reserve) / NANO < spent <= limit / NANO
    stored = redis_budget(server.url)
    assert stored["reserved"] == 0
    assert abs(stored["spent"] - spent * NANO) < 1000  # the shared counter is the sum of every instance's rows

    # `metrion quota` on any instance's config shows every instance's numbers, not that instance's database.
    result = CliRunner().invoke(main, ["quota", "--config", str(proxies[0].workdir / "config.yaml"), "metered",
                                       "--format", "json"], catch_exceptions=False)
    [row] = json.loads(result.stdout)
    assert row["requests"] == forwarded  # the monthly count of all three (a refused request is not counted)
    assert row["spent_usd"] == pytest.approx(stored["spent"] / NANO) and row["reserved_usd"] == 0
    assert row["remaining_usd"] == pytest.approx((limit - stored["spent"]) / NANO)
    server.kill()
    result = CliRunner().invoke(main, ["quota", "--config", str(proxies[0].workdir / "config.yaml"), "metered"])
    assert result.exit_code == 0 and "Redis unreachable" in result.stderr


def test_restarting_an_instance_mid_load_counts_nothing_twice(start_proxy, start_redis, mock: MockProvider) -> None:
    marker = f"restart {uuid.uuid4()}"
    body = chat_body(marker)
    reserve = reservation(CHAT, body)
    limit = 400 * reserve
    server = start_redis()
    proxies = [start_proxy(**shared_budget_config(server.url, limit / NANO)) for _ in range(2)]
    restarter = threading.Thread(target=lambda: (time.sleep(0.3), proxies[1].restart()))
    restarter.start()
    statuses: list[int] = []
    for _ in range(6):  # in waves, so that some arrive while the second instance is down and coming back
        statuses += burst(proxies, 30, body)
    restarter.join()
    statuses += burst(proxies, 30, body)
    wait_rows(proxies, statuses.count(200))

    def settled_rows() -> list[tuple]:
        return [row for row in rows(proxies, "1") if row[2] == "provider"]

    # the last settlements reach Redis
    wait_for(lambda: abs(redis_budget(server.url).get("spent", 0) - spent_of(settled_rows()) * NANO) < 1000)
    found = rows(proxies, "1")
    settled = [row for row in found if row[2] == "provider"]
    cut = [row for row in found if row[2] != "provider"]  # "shut down before the request finished"
    stored = redis_budget(server.url)
    assert abs(stored["spent"] - spent_of(settled) * NANO) < 1000  # every answered request counted once
    # A request cut by the shutdown keeps its reservation if it had one (it may have reached the provider).
    kept, rest = divmod(stored["reserved"], reserve)
    assert rest == 0 and kept <= len(cut)
    reached = sum(marker.encode() in r.body for r in mock.received)
    assert len(settled) <= reached <= len(settled) + kept


def test_without_redis_budgets_follow_on_failure_and_resume_where_they_were(
    start_proxy, start_redis, mock: MockProvider
) -> None:
    body = chat_body(f"redis lost {uuid.uuid4()}")
    reserve = reservation(CHAT, body)
    limit = 30 * reserve + reserve // 2  # fits 30 reservations
    server = start_redis()
    closed = start_proxy(**shared_budget_config(server.url, limit / NANO, on_failure="closed"))
    local = start_proxy(**shared_budget_config(server.url, limit / NANO, on_failure="local"))
    assert burst([closed, local], 20, body) == [200] * 20
    wait_rows([closed, local], 20)
    wait_for(lambda: redis_budget(server.url).get("reserved") == 0)  # the settlements of the last rows
    before = redis_budget(server.url)
    assert before["reserved"] == 0 and before["spent"] > 0
    server.kill()
    sent = len(mock.received)
    assert burst([closed], 10, body) == [503] * 10  # closed: nothing forwarded for anyone
    refused = httpx.post(f"{local.url}{CHAT}", content=body, headers=headers(), timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "budget_unavailable"
    assert burst([local], 10, body) == [503] * 10  # local: a budgeted token is refused (a share could overshoot)
    assert len(mock.received) == sent
    assert burst([local], 5, chat_body("open token"), key=OPEN) == [200] * 5  # others keep their share
    assert "tokens with a dollar budget are refused" in local.log_path.read_text()

    server.start()  # empty: a Redis without persistence lost the budget; the instances bring back what they saw
    deadline = time.monotonic() + 10
    while burst([closed, local], 2, body) != [200, 200]:
        assert time.monotonic() < deadline, "did not reconnect to Redis"
        time.sleep(0.2)
    assert redis_budget(server.url)["spent"] >= before["spent"]  # brought back, not a fresh budget
    statuses = burst([closed, local], 40, body)
    # Requests of the burst that finish are settled at once and give back what they did not use, so how many pass
    # depends on timing; what they all spend, with what was brought back, cannot pass the budget.
    assert statuses.count(200) > 0 and statuses.count(200) + statuses.count(429) == 40
    time.sleep(0.5)
    assert spent_of(rows([closed, local], "1")) <= limit / NANO


def test_redis_killed_mid_load_never_lets_the_budget_overshoot(start_proxy, start_redis, mock: MockProvider) -> None:
    marker = f"mid-load {uuid.uuid4()}"
    body = chat_body(marker)
    reserve = reservation(CHAT, body)
    limit = 40 * reserve + reserve // 2
    server = start_redis()
    proxies = [start_proxy(**shared_budget_config(server.url, limit / NANO, on_failure="local")) for _ in range(2)]
    statuses: list[int] = []
    outage = threading.Thread(target=lambda: (time.sleep(0.4), server.kill(), time.sleep(1.0), server.start()))
    outage.start()
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # waves of 6 across both instances, before, during and after the outage
        statuses += burst(proxies, 6, body)
    outage.join()
    assert set(statuses) <= {200, 429, 503} and statuses.count(503) > 0 and statuses.count(200) > 0
    while (wave := burst(proxies, 6, body)) != [429] * 6:  # then use up the budget
        statuses += wave
        assert len(statuses) < 2000
    wait_rows(proxies, statuses.count(200))
    assert sum(marker.encode() in r.body for r in mock.received) == statuses.count(200)
    assert spent_of(rows(proxies, "1")) <= limit / NANO  # the budget held through the loss of Redis and its data


def test_back_to_back_requests_on_redis_are_refused_only_once_finished_ones_have_settled(
        mock: MockProvider, start_redis, tmp_path_factory: pytest.TempPathFactory) -> None:
    """As with the budget in SQLite (test_e2e_budgets.py): a refusal while this instance's finished requests still
    hold their whole reservation waits for them to settle and asks Redis again."""
    server = start_redis()
    body = chat_body("back to back on redis")
    reserve = reservation(CHAT, body)
    limit = 20 * reserve
    proxy = late_writer_proxy(mock, tmp_path_factory.mktemp("late-settlement-redis"),
                              **shared_budget_config(server.url, limit / NANO))
    try:
        forwarded = back_to_back(proxy, body)
        spent = spent_of(wait_rows([proxy], forwarded + 1))
        assert (limit - reserve) / NANO < spent <= limit / NANO, (forwarded, spent)  # not refused early
    finally:
        proxy.stop()
