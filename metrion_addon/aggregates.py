"""Hourly and daily aggregates of the request log, kept up to date by the writer in the rows' own transaction.

`*_usage` sums requests, tokens, cost and latency per hour (or day) and per filterable dimension; `*_latency`
counts latencies per hour (or day), provider, model, token and status in log-scale buckets: charts never scan rows.
Both keep the model asked for (`requested_model`) beside the one answered, so that a model filter matches either.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

# NULLs never conflict in a unique key (SQLite and PostgreSQL alike), so the keys hold these stand-ins instead.
NO_TEXT = ""
NO_STATUS = 0
BUCKETS_PER_DOUBLING = 8  # latency buckets are 2^(1/8) ≈ 9 % wide: an estimate from one is within ±4.5 %
NANO = 1_000_000_000  # cost is summed in integer nano-dollars, so sums are exact and free of float noise

USAGE_KEY = ("hour", "provider", "model", "requested_model", "token_name", "requester", "status", "failed", "own")
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
# No requester (that would multiply the rows); the bucket right after the model, so that SQLite groups by
# (time, provider, model, bucket) in key order, without sorting. The model asked for mostly follows from the one
# answered (one dated name per alias), so keying on it too adds few rows.
LATENCY_KEY = ("hour", "provider", "model", "bucket", "requested_model", "token_name", "status")
LEVELS = {"hourly": ("hour", 13), "daily": ("day", 10)}  # table prefix: (time column, length of its ts prefix)
ROW_COLUMNS = (
    "ts",
    "provider",
    "model",
    "requested_model",
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
    requested_model: str | None
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
    requested_model: str | None
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
        row.requested_model or NO_TEXT,
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
            lkey = (key[0], key[1], key[2], latency_bucket(row.latency_ms), key[3], key[4], key[6])
            latency[lkey] = latency.get(lkey, 0) + 1
    return usage, latency


def _upserts(level: str) -> tuple[str, str]:
    time_column = LEVELS[level][0]
    usage_key = (time_column, *USAGE_KEY[1:])
    latency_key = (time_column, *LATENCY_KEY[1:])
    usage = (
        f"INSERT INTO {level}_usage ({', '.join(usage_key + USAGE_SUMS)}) "
        f"VALUES ({', '.join('?' * (len(usage_key) + len(USAGE_SUMS)))}) "
        f"ON CONFLICT ({', '.join(usage_key)}) DO UPDATE SET "
        + ", ".join(f"{name} = {level}_usage.{name} + excluded.{name}" for name in USAGE_SUMS)
    )
    latency = (
        f"INSERT INTO {level}_latency ({', '.join(latency_key)}, requests) "
        f"VALUES ({', '.join('?' * len(latency_key))}, ?) "
        f"ON CONFLICT ({', '.join(latency_key)}) DO UPDATE SET requests = {level}_latency.requests + excluded.requests"
    )
    return usage, latency


_UPSERTS = {level: _upserts(level) for level in LEVELS}
TABLES = tuple(f"{level}_{kind}" for level in LEVELS for kind in ("usage", "latency"))


def _by_day(sums: dict[tuple, Any]) -> dict[tuple, Any]:
    days: dict[tuple, Any] = {}
    for key, value in sums.items():
        day_key = (key[0][:10], *key[1:])
        if isinstance(value, int):
            days[day_key] = days.get(day_key, 0) + value
        elif day_key in days:
            days[day_key] = [a + b for a, b in zip(days[day_key], value, strict=True)]
        else:
            days[day_key] = list(value)
    return days


def add_to_hourly(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """Add `rows` to the hourly and daily aggregates. The writer calls this inside the transaction that inserts
    them, so the aggregates never disagree with the rows."""
    usage, latency = fold(rows)
    for level, (usage_sql, latency_sql) in _UPSERTS.items():
        if level == "daily":
            usage, latency = _by_day(usage), _by_day(latency)
        conn.executemany(usage_sql, [(*key, *sums) for key, sums in usage.items()])
        conn.executemany(latency_sql, [(*key, count) for key, count in latency.items()])


def tables_current(conn: sqlite3.Connection) -> bool:
    """Every aggregate table is there, in the current shape (an older Metrion's lack `requested_model`)."""
    for table in TABLES:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if "requested_model" not in columns:
            return False
    return True


def create_hourly(conn: sqlite3.Connection) -> None:
    """Create the aggregate tables if missing or outdated and, when they were, fill them from the rows logged."""
    if tables_current(conn):
        return
    conn.execute("BEGIN IMMEDIATE")  # another process may be building them too: the second one finds them made
    try:
        if tables_current(conn):
            conn.execute("COMMIT")
            return
        for table in TABLES:  # some but not all of them (an interrupted build), or an older Metrion's shape
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        for statement in table_definitions():
            conn.execute(statement)
        backfilled = _backfill(conn)
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


# SQLite's one dialect difference here: store rows in key order, so a period is one contiguous range to read.
CLUSTERED = " WITHOUT ROWID"


def table_definitions(integer: str = "INTEGER", clustered: str = CLUSTERED) -> list[str]:
    """CREATE TABLE IF NOT EXISTS statements of the aggregates, in a dialect's integer type (sums of nano-dollars
    need 64 bits: PostgreSQL's INTEGER has 32) and with its way of storing rows in key order."""
    statements = []
    for level, (time_column, _) in LEVELS.items():
        usage_key = (time_column, *USAGE_KEY[1:])
        columns = ", ".join(
            [f"{name} {integer if name in ('status', 'failed', 'own') else 'TEXT'} NOT NULL" for name in usage_key]
            + [f"{name} {integer} NOT NULL DEFAULT 0" for name in USAGE_SUMS]
        )
        statements.append(f"CREATE TABLE IF NOT EXISTS {level}_usage ({columns},"
                          f" PRIMARY KEY ({', '.join(usage_key)})){clustered}")
        latency_key = (time_column, *LATENCY_KEY[1:])
        columns = ", ".join(
            f"{name} {integer if name in ('status', 'bucket') else 'TEXT'} NOT NULL" for name in latency_key
        )
        statements.append(
            f"CREATE TABLE IF NOT EXISTS {level}_latency ({columns}, requests {integer} NOT NULL DEFAULT 0,"
            f" PRIMARY KEY ({', '.join(latency_key)})){clustered}"
        )
    return statements


def _backfill(conn: sqlite3.Connection) -> int:
    """Fill the empty aggregate tables from the logged rows in SQL: what fold() computes row by row (the same
    rounding: int(x + 0.5) and CAST(x + 0.5 AS INTEGER) both truncate), grouped by SQLite in one pass per table."""
    conn.create_function("metrion_latency_bucket", 1, latency_bucket, deterministic=True)
    failed = "(status IS NULL OR status >= 400 OR error IS NOT NULL)"
    sums = [
        "count(*)",
        *(f"coalesce(sum({name}), 0)" for name in USAGE_SUMS[1:7]),
        f"coalesce(sum(CAST(cost_usd * {NANO} + 0.5 AS INTEGER)), 0)",
        "count(cost_usd)",
        "coalesce(sum(CAST(latency_ms * 1000 + 0.5 AS INTEGER)), 0)",
        "count(latency_ms)",
        "coalesce(sum(CAST(ttfb_ms * 1000 + 0.5 AS INTEGER)), 0)",
        "count(ttfb_ms)",
    ]
    for level, (time_column, cut) in LEVELS.items():
        keys = [f"substr(ts, 1, {cut})", "provider", "coalesce(model, '')", "coalesce(requested_model, '')",
                "coalesce(token_name, '')", "coalesce(requester, '')", "coalesce(status, 0)", failed, "ttfb_ms IS NULL"]
        conn.execute(
            f"INSERT INTO {level}_usage ({time_column}, {', '.join(USAGE_KEY[1:] + USAGE_SUMS)}) "
            f"SELECT {', '.join(keys + sums)} FROM requests GROUP BY {', '.join(keys)}"
        )
        keys = [f"substr(ts, 1, {cut})", "provider", "coalesce(model, '')", "metrion_latency_bucket(latency_ms)",
                "coalesce(requested_model, '')", "coalesce(token_name, '')", "coalesce(status, 0)"]
        conn.execute(
            f"INSERT INTO {level}_latency ({time_column}, {', '.join(LATENCY_KEY[1:])}, requests) "
            f"SELECT {', '.join(keys)}, count(*) FROM requests WHERE latency_ms IS NOT NULL GROUP BY {', '.join(keys)}"
        )
    return conn.execute("SELECT count(*) FROM requests").fetchone()[0]
