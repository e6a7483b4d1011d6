"""The SQLite cache store: entries written by the one writer, read off the event loop, evicted LRU, purged."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from metrion_addon import store
from metrion_addon.cache import CacheEntry
from metrion_addon.store import CacheTouch, CacheWrite, RequestRecord, Writer
from metrion_addon.store.cache import SQLiteCacheStore, write_cache


def origin(cost: float | None = 0.5) -> RequestRecord:
    return RequestRecord(ts="2026-11-24T10:00:00.000Z", token_name="app", requester=None, provider="openai",
                         model="gpt-4o", path="/v1/chat/completions", method="POST", stream=False, status=200,
                         cost_usd=cost, price_source="config")


def entry(key: str, size: int = 100, created: float = 1000.0, lifetime: float = 60.0) -> CacheEntry:
    return CacheEntry(key, "app", "openai", "gpt-4o", 200, (("content-type", "application/json"),),
                      b"x" * size, False, created, created + lifetime)


def open_db(path: Path) -> sqlite3.Connection:
    conn = store.connect(path)
    store.create_schema(conn)
    return conn


def keys(conn: sqlite3.Connection) -> list[str]:
    return [key for (key,) in conn.execute("SELECT key FROM cache_entries ORDER BY key")]


def test_least_recently_used_entries_go_first_when_the_bound_is_passed(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "m.db")
    bound = 3 * entry("a").size
    with conn:
        write_cache(conn, [CacheWrite(entry(k, created=1000 + n), origin(), bound)
                                 for n, k in enumerate("abc")], [])
        write_cache(conn, [], [CacheTouch("a", 1010)])
        write_cache(conn, [CacheWrite(entry("d", created=1011), origin(), bound)], [])
    assert keys(conn) == ["a", "c", "d"]


def test_expired_entries_are_purged_when_new_ones_are_written(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "m.db")
    with conn:
        write_cache(conn, [CacheWrite(entry("old", lifetime=10), origin(), 1 << 20)], [])
        write_cache(conn, [CacheWrite(entry("new", created=1010), origin(), 1 << 20)], [])
    assert keys(conn) == ["new"]


def test_a_new_write_replaces_the_entry_and_takes_the_cost_of_its_priced_origin(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "m.db")
    with conn:
        write_cache(conn, [CacheWrite(entry("k", size=10), origin(0.5), 1 << 20)], [])
        write_cache(conn, [CacheWrite(entry("k", size=20, created=1001), origin(None), 1 << 20)], [])
    assert conn.execute("SELECT length(body), cost_usd, last_used FROM cache_entries").fetchall() == [
        (20, None, 1001.0)]


def test_the_writer_stores_entries_with_the_cost_it_priced_and_lookups_read_them_off_the_loop(
        tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    writer = Writer(store.SQLiteBackend(open_db(path)), price=lambda record: (0.75, "test"))
    writer.start()
    cache = SQLiteCacheStore(path, writer, 1 << 20)
    reader_threads: set[int] = set()
    cache._conn.set_trace_callback(lambda sql: reader_threads.add(threading.get_ident()))

    async def scenario() -> tuple[CacheEntry | None, CacheEntry | None, CacheEntry | None]:
        unpriced = RequestRecord(ts="2026-11-24T10:00:00.000Z", token_name="app", requester=None, provider="openai",
                                 model="gpt-4o", path="/v1/x", method="POST", stream=False, status=200)
        writer.put(unpriced)
        cache.put(entry("k"), unpriced)
        deadline = time.monotonic() + 5
        while (found := await cache.get("k", 1001.0)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return found, await cache.get("k", 1060.0), await cache.get("missing", 1001.0)

    found, expired, missing = asyncio.run(scenario())
    cache.close()
    writer.close()
    assert found == CacheEntry("k", "app", "openai", "gpt-4o", 200, (("content-type", "application/json"),),
                               b"x" * 100, False, 1000.0, 1060.0, cost_usd=0.75)
    assert expired is None and missing is None
    assert reader_threads and threading.main_thread().ident not in reader_threads
    with sqlite3.connect(path) as conn:  # the hit moved the entry to the young end
        assert conn.execute("SELECT last_used FROM cache_entries").fetchone() == (1001.0,)


def test_a_failing_lookup_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    open_db(path).close()
    cache = SQLiteCacheStore(path, Writer(store.SQLiteBackend(open_db(path))), 1 << 20)
    cache._conn.execute("PRAGMA query_only = 1")
    cache._conn.close()  # every read now raises sqlite3.ProgrammingError, an sqlite3.Error
    assert asyncio.run(cache.get("k", 0.0)) is None
    cache._executor.shutdown()
