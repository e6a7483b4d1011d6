"""The SQLite request log and limit counters, written by one batched writer thread off the event loop.

Everything else sends rows through a queue; a failed write keeps its rows and retries, and close() flushes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlite_utils

from metrion_addon.aggregates import add_to_hourly, create_hourly

if TYPE_CHECKING:
    from metrion_addon.cache import CacheEntry

log = logging.getLogger(__name__)


@dataclass
class RequestRecord:
    """One row of the `requests` table; cost_usd and price_source are filled in by the writer."""

    ts: str
    token_name: str | None
    requester: str | None
    provider: str
    model: str | None
    path: str
    method: str
    stream: bool
    status: int | None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    latency_ms: float | None = None
    ttfb_ms: float | None = None
    usage_source: str = "none"
    error: str | None = None
    auth_mode: str | None = None
    cost_usd: float | None = None
    price_source: str | None = None
    cached: bool = False  # answered from Metrion's response cache
    saved_usd: float | None = None  # on a cache hit: what the original request cost
    cache_status: str | None = None  # HIT, MISS or REFRESH when the request asked for the cache
    flow_id: str | None = dataclasses.field(default=None, compare=False)  # for mitmweb, not stored


@dataclass(frozen=True)
class BucketState:
    token_name: str
    tokens: float
    updated_at: float


@dataclass(frozen=True)
class MonthlyCount:
    token_name: str
    month: str
    requests: int


_CACHE_COLUMNS = ("key", "token_name", "provider", "model", "status", "headers", "body", "stream", "created_at",
            "expires_at", "last_used", "size", "cost_usd")
_UPSERT_CACHE = (f"INSERT OR REPLACE INTO cache_entries ({', '.join(_CACHE_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(_CACHE_COLUMNS))})")


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


COLUMNS = [f.name for f in dataclasses.fields(RequestRecord) if f.name != "flow_id"]
_ROW = f"({', '.join('?' * len(COLUMNS))})"
_ROWS_PER_INSERT = 500  # under SQLite's 32,766 bound parameters per statement
_UPSERT_BUCKET = (
    "INSERT INTO rate_buckets (token_name, tokens, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT(token_name) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at"
)
_UPSERT_MONTH = (
    "INSERT INTO monthly_usage (token_name, month, requests) VALUES (?, ?, ?) "
    "ON CONFLICT(token_name, month) DO UPDATE SET requests = excluded.requests"
)


def connect(path: Path | str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: no fsync per commit, still safe from corruption
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables and indexes if they are missing (idempotent)."""
    conn.execute("PRAGMA journal_mode = WAL")
    db = sqlite_utils.Database(conn)
    types = {f.name: f.type for f in dataclasses.fields(RequestRecord)}
    sql_types: dict[str, type] = {}
    for name in COLUMNS:
        kind = str(types[name])
        sql_types[name] = int if ("int" in kind or "bool" in kind) else float if "float" in kind else str
    db["requests"].create(
        {"id": int, **sql_types},
        pk="id",
        not_null={"ts", "provider", "path", "method", "stream", "usage_source"},
        if_not_exists=True,
    )
    existing = db["requests"].columns_dict
    for name, kind in sql_types.items():  # a database made by an older Metrion gains the new columns in place
        if name not in existing:
            db["requests"].add_column(name, kind)
    for columns in (["ts"], ["token_name", "ts"], ["provider", "ts"], ["model", "ts"]):
        db["requests"].create_index(columns, if_not_exists=True)
    db["rate_buckets"].create(
        {"token_name": str, "tokens": float, "updated_at": float}, pk="token_name", if_not_exists=True
    )
    db["monthly_usage"].create(
        {"token_name": str, "month": str, "requests": int}, pk=("token_name", "month"), if_not_exists=True
    )
    create_hourly(conn)  # a database from before the aggregates gets them built from its rows
    create_cache_schema(conn)


def load_counters(conn: sqlite3.Connection) -> tuple[list[BucketState], list[MonthlyCount]]:
    buckets = [BucketState(*row) for row in conn.execute("SELECT token_name, tokens, updated_at FROM rate_buckets")]
    months = [MonthlyCount(*row) for row in conn.execute("SELECT token_name, month, requests FROM monthly_usage")]
    return buckets, months


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
        conn.execute(_UPSERT_CACHE, (entry.key, entry.token_name, entry.provider, entry.model, entry.status,
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



Pricer = Callable[[RequestRecord], tuple[float | None, str | None]]
_CLOSE = object()


class Writer:
    """Owns the SQLite connection on its own thread; rows arrive through a queue and are written in batches."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        price: Pricer | None = None,
        on_written: Callable[[list[RequestRecord]], None] | None = None,
        retry_seconds: float = 1.0,
        batch_seconds: float = 0.05,
    ) -> None:
        self._conn = conn
        self._price = price
        self._on_written = on_written
        self._retry_seconds = retry_seconds
        self._batch_seconds = batch_seconds  # gather rows this long: fewer wake-ups and commits under load
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="metrion-writer", daemon=True)
        self.error: str | None = None  # the last write error, None while writes succeed

    @property
    def healthy(self) -> bool:
        return self.error is None

    def start(self) -> None:
        self._thread.start()

    def put(self, item: RequestRecord | BucketState | MonthlyCount | CacheWrite | CacheTouch) -> None:
        self._queue.put(item)

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued so far, then stop the thread and close the connection."""
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("metrion: the database writer did not finish within %.0f s", timeout)
                return
        self._conn.close()

    def _run(self) -> None:
        records: list[RequestRecord] = []
        counters: dict[tuple[type, str, str], BucketState | MonthlyCount] = {}
        closing = False
        while True:
            if not records and not counters and not closing:
                closing = self._take(self._queue.get(), records, counters)
                if not closing:
                    time.sleep(self._batch_seconds)
            while not closing:  # drain whatever else is waiting: that is the batch
                try:
                    closing = self._take(self._queue.get_nowait(), records, counters)
                except queue.Empty:
                    break
            if records or counters:
                if self._write(records, counters):
                    records, counters = [], {}
                elif closing:
                    log.error("metrion: %d request rows could not be written: %s", len(records), self.error)
                    return
                else:
                    time.sleep(self._retry_seconds)
                    continue
            if closing:
                return

    @staticmethod
    def _take(item: object, records: list[RequestRecord], counters: dict) -> bool:
        if item is _CLOSE:
            return True
        if isinstance(item, RequestRecord):
            records.append(item)
        elif isinstance(item, BucketState):
            counters[(BucketState, item.token_name, "")] = item
        elif isinstance(item, MonthlyCount):
            counters[(MonthlyCount, item.token_name, item.month)] = item
        elif isinstance(item, CacheWrite | CacheTouch):  # the latest write or touch of a key is the one that counts
            counters[(type(item), item.entry.key if isinstance(item, CacheWrite) else item.key, "")] = item
        return False

    def _write(self, records: list[RequestRecord], counters: dict) -> bool:
        for record in records:
            if self._price and record.price_source is None:
                record.cost_usd, record.price_source = self._price(record)
        try:
            with self._conn:
                self._conn.execute("BEGIN")
                # One multi-row INSERT per 500 rows: sqlite3 hands the GIL back and forth on every statement,
                # and each hand-off costs the event loop thread time, so fewer statements keep the loop fast.
                for start in range(0, len(records), _ROWS_PER_INSERT):
                    chunk = records[start : start + _ROWS_PER_INSERT]
                    values = ", ".join([_ROW] * len(chunk))
                    self._conn.execute(f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES {values}", _params(chunk))
                add_to_hourly(self._conn, records)
                for counter in counters.values():
                    if isinstance(counter, BucketState):
                        self._conn.execute(_UPSERT_BUCKET, (counter.token_name, counter.tokens, counter.updated_at))
                    elif isinstance(counter, MonthlyCount):
                        self._conn.execute(_UPSERT_MONTH, (counter.token_name, counter.month, counter.requests))
                writes = [item for item in counters.values() if isinstance(item, CacheWrite)]
                touches = [item for item in counters.values() if isinstance(item, CacheTouch)]
                if writes or touches:
                    write_cache(self._conn, writes, touches)
        except sqlite3.Error as e:
            if self.error is None:
                log.error("metrion: database write failed, will retry: %s", e)
            self.error = str(e)
            return False
        if self.error is not None:
            log.warning("metrion: database writes work again")
        self.error = None
        if self._on_written and records:
            self._on_written(records)
        return True


def _params(records: Iterable[RequestRecord]) -> list:
    return [getattr(record, name) for record in records for name in COLUMNS]
