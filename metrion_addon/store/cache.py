"""The response cache in SQLite: lookups off the event loop, writes applied by the one writer in its batches.

`cache_entries` holds each reply under its key; least recently used entries go when the size bound is passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from .records import CacheEntry, CacheTouch, CacheWrite, RequestRecord

log = logging.getLogger(__name__)

_CACHE_COLUMNS = ("key", "token_name", "provider", "model", "status", "headers", "body", "stream", "created_at",
                  "expires_at", "last_used", "size", "cost_usd")
_UPSERT = (f"INSERT OR REPLACE INTO cache_entries ({', '.join(_CACHE_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(_CACHE_COLUMNS))})")
_READ = ("SELECT key, token_name, provider, model, status, headers, body, stream, created_at, expires_at, cost_usd "
         "FROM cache_entries WHERE key = ? AND expires_at > ?")


def create_cache_schema(conn: sqlite3.Connection) -> None:
    """The cache table and its indexes, if missing (idempotent)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS cache_entries (key TEXT PRIMARY KEY, token_name TEXT NOT NULL, "
        "provider TEXT NOT NULL, model TEXT, status INTEGER NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL, "
        "stream INTEGER NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, last_used REAL NOT NULL, "
        "size INTEGER NOT NULL, cost_usd REAL)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS idx_cache_entries_lru ON cache_entries (last_used, size)")
    conn.execute("CREATE INDEX IF NOT EXISTS idx_cache_entries_expires ON cache_entries (expires_at)")


def write_cache(conn: sqlite3.Connection, writes: Sequence[CacheWrite], touches: Sequence[CacheTouch]) -> None:
    """Apply a batch inside the writer's transaction: upserts, LRU touches, then purge and evict."""
    for write in writes:
        entry = write.entry
        conn.execute(_UPSERT, (entry.key, entry.token_name, entry.provider, entry.model, entry.status,
                               json.dumps(entry.headers), entry.body, entry.stream, entry.created_at,
                               entry.expires_at, entry.created_at, entry.size, write.origin.cost_usd))
    conn.executemany("UPDATE cache_entries SET last_used = max(last_used, ?) WHERE key = ?",
                     [(touch.used_at, touch.key) for touch in touches])
    if writes:
        latest = writes[-1]
        conn.execute("DELETE FROM cache_entries WHERE expires_at <= ?", (latest.entry.created_at,))
        evict(conn, latest.max_bytes)


def evict(conn: sqlite3.Connection, max_bytes: int) -> int:
    """Delete the least recently used entries until the table holds at most `max_bytes`; how many went."""
    (total,) = conn.execute("SELECT total(size) FROM cache_entries").fetchone()
    excess = total - max_bytes
    if excess <= 0:
        return 0
    victims, freed = [], 0
    for rowid, size in conn.execute("SELECT rowid, size FROM cache_entries ORDER BY last_used, rowid"):
        victims.append((rowid,))
        freed += size
        if freed >= excess:
            break
    conn.executemany("DELETE FROM cache_entries WHERE rowid = ?", victims)
    return len(victims)


def _entry(row: tuple[Any, ...]) -> CacheEntry:
    key, token_name, provider, model, status, headers, body, stream, created_at, expires_at, cost = row
    return CacheEntry(key, token_name, provider, model, status, tuple(tuple(pair) for pair in json.loads(headers)),
                      bytes(body), bool(stream), created_at, expires_at, cost)


class _Queue(Protocol):
    def put(self, item: Any) -> None: ...


class SQLiteCacheStore:
    """Lookups on a read-only connection in one worker thread; writes and touches go through the writer."""

    def __init__(self, path: Path, writer: _Queue, max_bytes: int) -> None:
        self._conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 5000")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="metrion-cache-read")
        self._writer = writer
        self._max_bytes = max_bytes

    async def get(self, key: str, now: float) -> CacheEntry | None:
        loop = asyncio.get_running_loop()
        try:
            entry = await loop.run_in_executor(self._executor, self._read, key, now)
        except sqlite3.Error as e:  # a lookup that fails is a miss: the request is forwarded and metered as usual
            log.warning("metrion: cache lookup failed, answering from the provider: %s", e)
            return None
        if entry is not None:
            self._writer.put(CacheTouch(key, now))
        return entry

    def _read(self, key: str, now: float) -> CacheEntry | None:
        row = self._conn.execute(_READ, (key, now)).fetchone()
        return None if row is None else _entry(row)

    def put(self, entry: CacheEntry, origin: RequestRecord) -> None:
        self._writer.put(CacheWrite(entry, origin, self._max_bytes))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._conn.close()


STATS_COLUMNS = ["entries", "expired", "bytes", "lookups", "hits", "refreshes", "hit_rate", "saved_usd"]


def cache_stats(conn: sqlite3.Connection, now: float, start: str | None = None, end: str | None = None) -> dict:
    """What the cache holds now, and how it did between `start` and `end` (stored timestamps; None = open)."""
    entries, expired, size = conn.execute(
        "SELECT count(*) FILTER (WHERE expires_at > :now), count(*) FILTER (WHERE expires_at <= :now),"
        " coalesce(sum(size), 0) FROM cache_entries", {"now": now}).fetchone()
    period = [clause for clause, bound in (("ts >= :start", start), ("ts < :end", end)) if bound is not None]
    lookups, hits, refreshes, saved = conn.execute(
        "SELECT count(*) FILTER (WHERE cache_status IN ('HIT', 'MISS')), count(*) FILTER (WHERE cache_status = 'HIT'),"
        " count(*) FILTER (WHERE cache_status = 'REFRESH'), coalesce(sum(saved_usd), 0.0) FROM requests"
        + "".join(f" {'WHERE' if i == 0 else 'AND'} {clause}" for i, clause in enumerate(period)),
        {"start": start, "end": end},
    ).fetchone()
    return {"entries": entries, "expired": expired, "bytes": int(size), "lookups": lookups, "hits": hits,
            "refreshes": refreshes, "hit_rate": hits / lookups if lookups else None, "saved_usd": saved}


def clear_cache(conn: sqlite3.Connection, token: str | None = None, model: str | None = None,
                base_model: Callable[[str], str] = str) -> int:
    """Delete the entries of `token` and of `model` (as returned, or as `base_model` of it); how many went."""
    conn.create_function("base_model", 1, lambda stored: stored and base_model(stored), deterministic=True)
    with conn:
        cursor = conn.execute(
            "DELETE FROM cache_entries WHERE (:token IS NULL OR token_name = :token) "
            "AND (:model IS NULL OR model = :model OR base_model(model) = :model)", {"token": token, "model": model})
    return cursor.rowcount
