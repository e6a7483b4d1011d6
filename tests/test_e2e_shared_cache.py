"""The response cache on one real Redis shared by several mitmdump processes: what one stores, another replays.

Entries expire by Redis TTL and by their own lifetime on Metrion's clock; the size bound evicts the least recently used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import redis
from click.testing import CliRunner
from harness import APP_TOKEN
from test_e2e_cache import CACHE, chat, set_clock
from test_e2e_metering import label, received_for, request_for

from metrion_addon.cli import main
from metrion_addon.mock_provider import MockProvider


def shared(url: str, **extra: object) -> dict:
    return {"shared": {"redis": url}, **extra}


def entries(url: str) -> set[bytes]:
    return set(redis.Redis.from_url(url).hkeys("metrion:cache:sizes"))


def wait_for_new_entry(url: str, before: set[bytes], timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while not (new := entries(url) - before):
        assert time.monotonic() < deadline, "no cache entry was stored in Redis"
        time.sleep(0.02)
    (key,) = new
    return key


def test_an_entry_stored_through_one_instance_is_a_hit_on_another(start_proxy, start_redis, mock: MockProvider
                                                                  ) -> None:
    server = start_redis()
    first_proxy, second_proxy = (start_proxy(**shared(server.url)) for _ in range(2))
    for stream in (False, True):
        path, body, headers = request_for("openai", stream=stream)
        who = label()
        headers = {**headers, **CACHE, "x-metrion-user": who}
        before = entries(server.url)
        first = httpx.post(f"{first_proxy.url}{path}", json=body, headers=headers, timeout=30)
        assert first.headers["x-metrion-cache"] == "MISS"
        wait_for_new_entry(server.url, before)
        second = httpx.post(f"{second_proxy.url}{path}", json=body, headers=headers, timeout=30)
        assert second.headers["x-metrion-cache"] == "HIT" and second.content == first.content
        if stream:  # replayed as a stream, the same bytes
            assert second.headers["content-type"].startswith("text/event-stream")
            assert second.headers["transfer-encoding"] == "chunked"
        assert sum(body["messages"][0]["content"].encode() in r.body for r in mock.received) == 1
        (miss,) = first_proxy.rows("requester = ?", (who,), n=1)
        (hit,) = second_proxy.rows("requester = ?", (who,), n=1)
        assert (miss["cache_status"], hit["cache_status"], hit["cost_usd"]) == ("MISS", "HIT", 0)
        assert miss["cost_usd"] > 0 and hit["saved_usd"] == pytest.approx(miss["cost_usd"])


def test_lifetimes_and_the_size_bound_hold_across_instances(start_proxy, start_redis, mock: MockProvider,
                                                            tmp_path: Path) -> None:
    server = start_redis()
    client = redis.Redis.from_url(server.url)
    clock = tmp_path / "clock"
    env = {"METRION_CLOCK_FILE": str(clock)}
    who = label()

    def at(second: int) -> None:  # every step at its own time: the least recently used is never a tie
        set_clock(clock, f"2026-01-01T00:{second // 60:02d}:{second % 60:02d}Z")

    at(0)
    probe = start_proxy(env=env, **shared(server.url))
    chat(probe, f"{who}-0")
    size = int(client.hget("metrion:cache:sizes", wait_for_new_entry(server.url, set())))
    probe.stop()
    config = shared(server.url, cache={"max_mb": 9.5 * size / 1024 / 1024})  # nine such replies fit, ten do not
    a, b = (start_proxy(env=env, **config) for _ in range(2))
    at(1)
    before = entries(server.url)
    assert chat(a, f"{who}-1", headers={"cache-control": "max-age=60"}).headers["x-metrion-cache"] == "MISS"
    wait_for_new_entry(server.url, before)
    at(60)
    assert chat(b, f"{who}-1").headers["x-metrion-cache"] == "HIT"
    at(61)
    assert chat(b, f"{who}-1").headers["x-metrion-cache"] == "MISS"  # expired on Metrion's clock; stored afresh
    time.sleep(0.3)
    for n in range(2, 9):  # entries 0 to 8: the cache is full
        at(60 + n)
        before = entries(server.url)
        chat((a, b)[n % 2], f"{who}-{n}")
        wait_for_new_entry(server.url, before)
    at(70)
    assert chat(b, f"{who}-0").headers["x-metrion-cache"] == "HIT"  # 0 is now the most recently used, 1 the least
    at(71)
    before = entries(server.url)
    chat(a, f"{who}-9")
    wait_for_new_entry(server.url, before)
    assert len(entries(server.url)) == 9 and int(client.get("metrion:cache:bytes")) == 9 * size
    hits = [chat((a, b)[n % 2], f"{who}-{n}").headers["x-metrion-cache"] for n in (0, *range(2, 10))]
    assert hits == ["HIT"] * 9
    assert chat(a, f"{who}-1").headers["x-metrion-cache"] == "MISS"  # evicted
    assert len(received_for(mock, f"{who}-0")) == 1
    assert client.pttl(f"metrion:cache:e:{sorted(entries(server.url))[0].decode()}") > 0  # Redis expires them too

    def cli(*args: str) -> str:
        result = CliRunner().invoke(main, [*args, "--config", str(a.workdir / "config.yaml")], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    (stats,) = json.loads(cli("cache", "stats", "--format", "json"))
    # What Redis holds for every instance (the command reads the real clock: to it these entries are old).
    assert (stats["entries"] + stats["expired"], stats["bytes"]) == (9, 9 * size)
    assert cli("cache", "clear", "--model", "gpt-4o", "--token", "someone-else") == "removed 0 cache entries\n"
    assert cli("cache", "clear", "--model", "gpt-4o") == "removed 9 cache entries\n"
    assert entries(server.url) == set() and int(client.get("metrion:cache:bytes")) == 0
    assert chat(b, f"{who}-0").headers["x-metrion-cache"] == "MISS"


def test_a_cache_lookup_without_redis_is_not_a_way_around_closed(start_proxy, start_redis, mock: MockProvider) -> None:
    server = start_redis()
    proxy = start_proxy(**shared(server.url))
    path, body, headers = request_for("openai", stream=False)
    headers = {**headers, **CACHE, "authorization": f"Bearer {APP_TOKEN}"}
    assert httpx.post(f"{proxy.url}{path}", json=body, headers=headers, timeout=30).status_code == 200
    server.kill()
    refused = httpx.post(f"{proxy.url}{path}", json=body, headers=headers, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "limits_unavailable"
