"""Several mitmdump processes on one real Redis behave as one Metrion: exact limits, and a defined answer without Redis.

Clocks are frozen with METRION_CLOCK_FILE (all instances read the same file), so no bucket refills mid-test.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from harness import Proxy, token
from test_e2e_metering import request_for

from metrion_addon.mock_provider import MockProvider

SHARED = token(21)
NOW = "2026-11-10T12:00:00Z"


def shared_config(redis_url: str, rate_limit: int = 1000, cap: int | None = None, on_failure: str = "closed") -> dict:
    return {
        "rate_limit": rate_limit,
        "shared": {"redis": redis_url, "on_failure": on_failure},
        "plans": {"team": {"monthly_requests": cap}},
        "tokens": [{"name": "team", "token": SHARED, "plan": "team", "keys": {"openai": "k"}}],
    }


def start_instances(start_proxy, n: int, clock: Path, **config: object) -> list[Proxy]:
    clock.write_text(NOW)
    return [start_proxy(env={"METRION_CLOCK_FILE": str(clock)}, **config) for _ in range(n)]


def burst(proxies: list[Proxy], n: int, marker: str) -> list[int]:
    """`n` concurrent requests spread round-robin over `proxies`; their statuses (0 when the connection failed)."""
    path, body, _ = request_for("openai", stream=False)
    body = {**body, "messages": [{"role": "user", "content": marker}]}
    targets = itertools.islice(itertools.cycle(proxies), n)

    async def one(client: httpx.AsyncClient, proxy: Proxy) -> int:
        try:
            response = await client.post(f"{proxy.url}{path}", json=body, headers={"authorization": f"Bearer {SHARED}"})
        except httpx.TransportError:
            return 0
        return response.status_code

    async def run() -> list[int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n), timeout=30) as client:
            return list(await asyncio.gather(*[one(client, proxy) for proxy in targets]))

    return asyncio.run(run())


def forwarded(mock: MockProvider, marker: str) -> int:
    return sum(marker.encode() in r.body for r in mock.received)


def month_counter(url: str) -> int:
    return int(redis.Redis.from_url(url).get("metrion:month:team:2026-11") or 0)


def test_two_instances_on_one_redis_admit_exactly_one_bucket_of_a_concurrent_burst(
    start_proxy, start_redis, mock: MockProvider, tmp_path: Path
) -> None:
    server = start_redis()
    proxies = start_instances(start_proxy, 2, tmp_path / "now", **shared_config(server.url, rate_limit=100))
    marker = f"burst {uuid.uuid4()}"
    statuses = burst(proxies, 300, marker)
    assert statuses.count(200) == 100 and statuses.count(429) == 200
    assert forwarded(mock, marker) == 100


def test_monthly_cap_is_exact_across_three_instances_while_one_restarts(
    start_proxy, start_redis, mock: MockProvider, tmp_path: Path
) -> None:
    server = start_redis()
    proxies = start_instances(start_proxy, 3, tmp_path / "now", **shared_config(server.url, cap=120))
    marker = f"cap {uuid.uuid4()}"
    restarter = threading.Thread(target=lambda: (time.sleep(0.3), proxies[1].restart()))
    restarter.start()
    statuses: list[int] = []
    for _ in range(6):  # in waves, so that some arrive while the second instance is down and coming back
        statuses += burst(proxies, 40, marker)
    restarter.join()
    statuses += burst(proxies, 30, marker)
    # The cap is spent exactly and nothing forwarded went uncounted. A request the restart cut (the client saw its
    # connection fail) may have been counted and forwarded, or counted and never forwarded: counted, never free.
    assert month_counter(server.url) == 120
    assert statuses.count(200) <= forwarded(mock, marker) <= 120
    assert 120 - statuses.count(200) <= statuses.count(0)
    assert statuses.count(429) >= 30


def test_an_instance_with_other_limits_refuses_to_start_with_one_line(start_proxy, start_redis, tmp_path: Path) -> None:
    server = start_redis()
    start_instances(start_proxy, 1, tmp_path / "now", **shared_config(server.url, rate_limit=100))
    with pytest.raises(RuntimeError, match=r"shared\.redis: tokens, plans or limits differ from 1 of 1 running"):
        start_proxy(**shared_config(server.url, rate_limit=200))


def test_without_redis_closed_answers_503_forwards_nothing_and_recovers(
    start_proxy, start_redis, mock: MockProvider, tmp_path: Path
) -> None:
    server = start_redis()
    proxies = start_instances(start_proxy, 2, tmp_path / "now", **shared_config(server.url))
    marker = f"closed {uuid.uuid4()}"
    assert burst(proxies, 20, marker) == [200] * 20
    server.kill()
    down = burst(proxies, 40, marker + " down")
    assert down == [503] * 40 and forwarded(mock, marker + " down") == 0
    response = httpx.post(f"{proxies[0].url}/api/proxy/openai/v1/chat/completions", timeout=10,
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
                          headers={"authorization": f"Bearer {SHARED}"})
    assert response.json()["error"]["code"] == "limits_unavailable"
    assert "Redis" in proxies[0].log_path.read_text()
    server.start()
    deadline = time.monotonic() + 10
    while burst(proxies, 2, marker + " back") != [200, 200]:
        assert time.monotonic() < deadline, "did not reconnect to Redis"
        time.sleep(0.2)
    assert month_counter(server.url) >= 2  # counting in Redis again


def test_without_redis_local_keeps_each_instance_to_its_share_and_hands_counts_back(
    start_proxy, start_redis, mock: MockProvider, tmp_path: Path
) -> None:
    server = start_redis()
    proxies = start_instances(start_proxy, 2, tmp_path / "now",
                              **shared_config(server.url, rate_limit=1000, cap=100, on_failure="local"))
    marker = f"local {uuid.uuid4()}"
    assert burst(proxies, 40, marker) == [200] * 40  # 60 left of the cap
    time.sleep(2.5)  # a heartbeat: each instance learns what the other counted
    server.kill()
    statuses = burst(proxies, 100, marker)
    assert statuses.count(200) == 60 and statuses.count(429) == 40  # 30 each: half of what was left
    assert "enforcing this instance's share locally" in proxies[0].log_path.read_text()
    server.start()
    deadline = time.monotonic() + 10
    while month_counter(server.url) != 100:  # both handed their local counts to the Redis that lost everything
        assert time.monotonic() < deadline, f"Redis counter is {month_counter(server.url)}"
        time.sleep(0.2)
    time.sleep(1)  # both back on Redis
    assert burst(proxies, 10, marker) == [429] * 10
    assert forwarded(mock, marker) == 100


def test_cache_hits_take_from_the_shared_bucket_but_not_from_the_monthly_cap(
    start_proxy, start_redis, tmp_path: Path
) -> None:
    server = start_redis()
    proxy = start_instances(start_proxy, 1, tmp_path / "now", **shared_config(server.url, rate_limit=1000, cap=2))[0]
    path, body, _ = request_for("openai", stream=False)

    def chat(text: str) -> httpx.Response:
        return httpx.post(f"{proxy.url}{path}", json={**body, "messages": [{"role": "user", "content": text}]},
                          headers={"authorization": f"Bearer {SHARED}", "x-metrion-cache": "true"}, timeout=30)

    assert chat("cached").headers["x-metrion-cache"] == "MISS"
    deadline = time.monotonic() + 10
    while not redis.Redis.from_url(server.url).hlen("metrion:cache:sizes"):  # with shared.redis the cache is there
        assert time.monotonic() < deadline, "no cache entry was stored"
        time.sleep(0.05)
    hit = chat("cached")
    assert hit.status_code == 200 and hit.headers["x-metrion-cache"] == "HIT"
    bucket = redis.Redis.from_url(server.url).hget("metrion:rate:team", "tokens")
    assert month_counter(server.url) == 1 and float(bucket) == 998  # two taken from the bucket, one counted
    assert chat("another").status_code == 200
    assert chat("a third").status_code == 429
