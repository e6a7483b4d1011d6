"""Hourly aggregates of the request log, kept up to date by the writer in the same transaction as the rows.

`hourly_usage` sums requests, tokens, cost and latency per hour and per filterable dimension; `hourly_latency`
counts latencies per hour, provider, model and status in fine log-scale buckets, so charts never scan raw rows.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

# NULLs never conflict in a unique key (SQLite and PostgreSQL alike), so the keys hold these stand-ins instead.
NO_TEXT = ""
NO_STATUS = 0
BUCKETS_PER_DOUBLING = 8  # latency buckets are 2^(1/8) ≈ 9 % wide: an estimate from one is within ±4.5 %
NANO = 1_000_000_000  # cost is summed in integer nano-dollars, so sums are exact and free of float noise

USAGE_KEY = ("hour", "provider", "model", "token_name", "requester", "status", "failed", "own")
USAGE_SUMS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_nusd",
    "priced",
    "latency_us",
    "latency_count",
    "ttfb_us",
    "ttfb_count",
)
LATENCY_KEY = ("hour", "provider", "model", "status", "bucket")
ROW_COLUMNS = (
    "ts",
    "provider",
    "model",
    "token_name",
    "requester",
    "status",
    "error",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
    "latency_ms",
    "ttfb_ms",
)


class Row(Protocol):
    """What aggregation reads from a request row (a RequestRecord, or a row read back from the table)."""

    ts: str
    provider: str
    model: str | None
    token_name: str | None
    requester: str | None
    status: int | None
    error: str | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_usd: float | None
    latency_ms: float | None
    ttfb_ms: float | None


@dataclass(frozen=True)
class StoredRow:
    """A request row read back from the table, in ROW_COLUMNS order."""

    ts: str
    provider: str
    model: str | None
    token_name: str | None
    requester: str | None
    status: int | None
    error: str | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_usd: float | None
    latency_ms: float | None
    ttfb_ms: float | None


def is_error(status: int | None, error: str | None) -> bool:
    """The one definition of a failed request: a status ≥ 400, no status, or an error message."""
    return status is None or status >= 400 or error is not None


def nano_usd(cost: float) -> int:
    return int(cost * NANO + 0.5)


def micros(ms: float) -> int:
    return int(ms * 1000 + 0.5)


def latency_bucket(ms: float) -> int:
    """The log-scale bucket holding `ms`: bucket b covers [2^(b/8), 2^((b+1)/8)) ms; under 1 ms is bucket 0."""
    return 0 if ms < 1 else math.floor(math.log2(ms) * BUCKETS_PER_DOUBLING)


def bucket_bounds(bucket: int) -> tuple[float, float]:
    low = 0.0 if bucket == 0 else 2 ** (bucket / BUCKETS_PER_DOUBLING)
    return low, 2 ** ((bucket + 1) / BUCKETS_PER_DOUBLING)


def bucket_estimate(bucket: int) -> float:
    """The value a percentile falling in `bucket` is reported as: the bucket's geometric middle."""
    return 2 ** ((bucket + 0.5) / BUCKETS_PER_DOUBLING)


def usage_key(row: Row) -> tuple:
    return (
        row.ts[:13],
        row.provider,
        row.model or NO_TEXT,
        row.token_name or NO_TEXT,
        row.requester or NO_TEXT,
        row.status or NO_STATUS,
        int(is_error(row.status, row.error)),
        int(row.ttfb_ms is None),  # Metrion answered itself: nothing came from a provider
    )


def usage_sums(row: Row) -> tuple[int, ...]:
    return (
        1,
        row.input_tokens or 0,  # NULL when the provider sent a count no column can hold (store.storable)
        row.output_tokens or 0,
        row.cache_read_tokens or 0,
        row.cache_write_tokens or 0,
        row.reasoning_tokens or 0,
        row.total_tokens or 0,
        0 if row.cost_usd is None else nano_usd(row.cost_usd),
        int(row.cost_usd is not None),
        0 if row.latency_ms is None else micros(row.latency_ms),
        int(row.latency_ms is not None),
        0 if row.ttfb_ms is None else micros(row.ttfb_ms),
        int(row.ttfb_ms is not None),
    )


def fold(rows: Iterable[Row]) -> tuple[dict[tuple, list[int]], dict[tuple, int]]:
    """The aggregate rows that `rows` add: sums per usage key, and latency counts per latency key."""
    usage: dict[tuple, list[int]] = {}
    latency: dict[tuple, int] = {}
    for row in rows:
        key = usage_key(row)
        sums = usage_sums(row)
        into = usage.get(key)
        if into is None:
            usage[key] = list(sums)
        else:
            for i, value in enumerate(sums):
                into[i] += value
        if row.latency_ms is not None:
            lkey = (key[0], key[1], key[2], key[5], latency_bucket(row.latency_ms))
            latency[lkey] = latency.get(lkey, 0) + 1
    return usage, latency


_USAGE_UPSERT = (
    f"INSERT INTO hourly_usage ({', '.join(USAGE_KEY + USAGE_SUMS)}) "
    f"VALUES ({', '.join('?' * (len(USAGE_KEY) + len(USAGE_SUMS)))}) "
    f"ON CONFLICT ({', '.join(USAGE_KEY)}) DO UPDATE SET "
    + ", ".join(f"{name} = hourly_usage.{name} + excluded.{name}" for name in USAGE_SUMS)
)
_LATENCY_UPSERT = (
    f"INSERT INTO hourly_latency ({', '.join(LATENCY_KEY)}, requests) VALUES ({', '.join('?' * len(LATENCY_KEY))}, ?) "
    f"ON CONFLICT ({', '.join(LATENCY_KEY)}) DO UPDATE SET requests = hourly_latency.requests + excluded.requests"
)


def add_to_hourly(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """Add `rows` to the hourly aggregates. The writer calls this inside the transaction that inserts them."""
    usage, latency = fold(rows)
    conn.executemany(_USAGE_UPSERT, [(*key, *sums) for key, sums in usage.items()])
    conn.executemany(_LATENCY_UPSERT, [(*key, count) for key, count in latency.items()])


def _tables_exist(conn: sqlite3.Connection) -> bool:
    found = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('hourly_usage', 'hourly_latency')"
    ).fetchone()[0]
    return found == 2


def create_hourly(conn: sqlite3.Connection) -> None:
    """Create the aggregate tables if missing and, when they were, fill them from the rows already logged."""
    if _tables_exist(conn):
        return
    conn.execute("BEGIN IMMEDIATE")  # another process may be building them too: the second one finds them made
    try:
        if _tables_exist(conn):
            conn.execute("COMMIT")
            return
        conn.execute("DROP TABLE IF EXISTS hourly_usage")  # one of the two alone is an interrupted older build
        conn.execute("DROP TABLE IF EXISTS hourly_latency")
        usage_columns = ", ".join(
            [f"{name} {'INTEGER' if name in ('status', 'failed', 'own') else 'TEXT'} NOT NULL" for name in USAGE_KEY]
            + [f"{name} INTEGER NOT NULL DEFAULT 0" for name in USAGE_SUMS]
        )
        conn.execute(f"CREATE TABLE hourly_usage ({usage_columns}, PRIMARY KEY ({', '.join(USAGE_KEY)}))")
        conn.execute(
            "CREATE TABLE hourly_latency (hour TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL,"
            " status INTEGER NOT NULL, bucket INTEGER NOT NULL, requests INTEGER NOT NULL DEFAULT 0,"
            f" PRIMARY KEY ({', '.join(LATENCY_KEY)}))"
        )
        backfilled = 0
        for chunk in _stored_rows(conn):
            add_to_hourly(conn, chunk)
            backfilled += len(chunk)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if backfilled:
        log.info("metrion: hourly aggregates built from %d existing rows", backfilled)


# Columns an older Metrion added in place hold NULL in its rows: read those counts as 0.
STORED_ROW_SELECT = ", ".join(
    f"coalesce({name}, 0)" if name.endswith("_tokens") else name for name in ROW_COLUMNS
)


def _stored_rows(conn: sqlite3.Connection, chunk: int = 50_000) -> Iterator[list[StoredRow]]:
    cursor = conn.execute(f"SELECT {STORED_ROW_SELECT} FROM requests")
    while batch := cursor.fetchmany(chunk):
        yield [StoredRow(*row) for row in batch]
