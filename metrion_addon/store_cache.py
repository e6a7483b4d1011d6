"""The response cache's entries in the request database: read off the event loop, written by the one writer.

`cache_entries` holds each reply under its key; the writer applies CacheWrite/CacheTouch items in its batches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .cache import CacheEntry
from .store import RequestRecord

log = logging.getLogger(__name__)

_COLUMNS = ("key", "token_name", "provider", "model", "status", "headers", "body", "stream", "created_at",
            "expires_at", "last_used", "size", "cost_usd")
_UPSERT = f"INSERT OR REPLACE INTO cache_entries ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_READ = ("SELECT key, token_name, provider, model, status, headers, body, stream, created_at, expires_at, cost_usd "
         "FROM cache_entries WHERE key = ? AND expires_at > ?")


@dataclass(frozen=True)
class CacheWrite:
    """Store `entry`; its cost is `origin`'s, read when written (the writer prices `origin` first)."""

    entry: CacheEntry
    origin: RequestRecord
    max_bytes: int  # the size bound in force: older entries are evicted until the table fits


@dataclass(frozen=True)
class CacheTouch:
    """An entry was used at `used_at`: it moves to the young end of the LRU order."""

    key: str
    used_at: float


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
