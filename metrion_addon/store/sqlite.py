"""The SQLite backend: schema, connection, counter loading, and one transaction per batch of rows.

Everything SQLite-specific lives here; the Writer (writer.py) only sees the Backend interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import sqlite_utils

from metrion_addon.aggregates import add_to_hourly, create_hourly

from .cache import create_cache_schema, write_cache
from .records import (
    COLUMNS,
    REQUIRED,
    AlertEvent,
    BucketState,
    BudgetState,
    CacheTouch,
    CacheWrite,
    Counter,
    DeadLetter,
    MonthlyCount,
    RequestRecord,
)

_ROW = f"({', '.join('?' * len(COLUMNS))})"
_ROWS_PER_INSERT = 500  # under SQLite's 32,766 bound parameters per statement
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES "
_WAL_BYTES = 4 * 1024 * 1024
_INSERT_DEAD = "INSERT INTO dead_letters (ts, error, row) VALUES (?, ?, ?)"
_UPSERT_BUCKET = (
    "INSERT INTO rate_buckets (token_name, tokens, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT(token_name) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at"
)
_UPSERT_MONTH = (
    "INSERT INTO monthly_usage (token_name, month, requests) VALUES (?, ?, ?) "
    "ON CONFLICT(token_name, month) DO UPDATE SET requests = excluded.requests"
)
_UPSERT_BUDGET = (
    "INSERT INTO budget_usage (token_name, month, spent_nanousd, reserved_nanousd, version) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(token_name, month) DO UPDATE SET spent_nanousd = excluded.spent_nanousd, "
    "reserved_nanousd = excluded.reserved_nanousd, version = excluded.version "
    "WHERE excluded.version > budget_usage.version"
)


def connect(path: Path | str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: no fsync per commit, still safe from corruption
    conn.execute(f"PRAGMA journal_size_limit = {_WAL_BYTES}")  # a checkpointed WAL gives its disk space back
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables and indexes if they are missing (idempotent)."""
    conn.execute("PRAGMA journal_mode = WAL")
    db = sqlite_utils.Database(conn)
    types = {f.name: f.type for f in dataclasses.fields(RequestRecord)}
    sql_types = {name: _sql_type(types[name]) for name in COLUMNS}
    db["requests"].create(
        {"id": int, **sql_types},
        pk="id",
        not_null=set(REQUIRED),
        if_not_exists=True,
    )
    existing = db["requests"].columns_dict
    for name, kind in sql_types.items():  # a database made by an older Metrion gains the new columns in place
        if name not in existing:
            db["requests"].add_column(name, kind)
    indexes = (["ts"], ["token_name", "ts"], ["provider", "ts"], ["model", "ts"], ["requested_model", "ts"],
               ["requester", "ts"])
    for columns in indexes:
        db["requests"].create_index(columns, if_not_exists=True)
    db["requests"].create_index(["uid"], unique=True, if_not_exists=True)
    db["rate_buckets"].create(
        {"token_name": str, "tokens": float, "updated_at": float}, pk="token_name", if_not_exists=True
    )
    db["monthly_usage"].create(
        {"token_name": str, "month": str, "requests": int}, pk=("token_name", "month"), if_not_exists=True
    )
    db["budget_usage"].create(
        {"token_name": str, "month": str, "spent_nanousd": int, "reserved_nanousd": int, "version": int},
        pk=("token_name", "month"), if_not_exists=True,
    )
    db["alert_events"].create(
        {"id": int, **{field.name: _sql_type(field.type) for field in dataclasses.fields(AlertEvent)}},
        pk="id", not_null={"ts", "rule", "level", "channel"}, if_not_exists=True,
    )
    db["alert_events"].create_index(["rule", "ts"], if_not_exists=True)
    db["dead_letters"].create({"id": int, "ts": str, "error": str, "row": str}, pk="id", if_not_exists=True)
    create_hourly(conn)  # a database from before the aggregates gets them built from its rows
    create_cache_schema(conn)


def _sql_type(annotation: object) -> type:
    kind = str(annotation)
    return int if ("int" in kind or "bool" in kind) else float if "float" in kind else str


_ALERT_COLUMNS = [field.name for field in dataclasses.fields(AlertEvent)]
_INSERT_ALERT = (f"INSERT INTO alert_events ({', '.join(_ALERT_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(_ALERT_COLUMNS))})")


def insert_alert_event(conn: sqlite3.Connection, event: AlertEvent) -> None:
    conn.execute(_INSERT_ALERT, dataclasses.astuple(event))


def load_alert_history(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
    """{(rule, level): when it last notified} over `alert_events`, test notifications left out."""
    query = "SELECT rule, level, max(ts) FROM alert_events WHERE test = 0 GROUP BY rule, level"
    return {(rule, level): ts for rule, level, ts in conn.execute(query)}


def latest_alerts(conn: sqlite3.Connection) -> dict[str, tuple[str, str]]:
    """{rule: (ts, level)} of each rule's latest notification (tests left out)."""
    query = ("SELECT rule, ts, level FROM alert_events WHERE id IN "
             "(SELECT max(id) FROM alert_events WHERE test = 0 GROUP BY rule)")
    return {rule: (ts, level) for rule, ts, level in conn.execute(query)}


def load_counters(conn: sqlite3.Connection) -> tuple[list[BucketState], list[MonthlyCount]]:
    buckets = [BucketState(*row) for row in conn.execute("SELECT token_name, tokens, updated_at FROM rate_buckets")]
    months = [MonthlyCount(*row) for row in conn.execute("SELECT token_name, month, requests FROM monthly_usage")]
    return buckets, months


def load_budgets(conn: sqlite3.Connection) -> list[BudgetState]:
    query = "SELECT token_name, month, spent_nanousd, reserved_nanousd, version FROM budget_usage"
    return [BudgetState(*row) for row in conn.execute(query)]


def write_counters(conn: sqlite3.Connection, counters: Sequence[Counter], dead_letters: Sequence[DeadLetter]) -> None:
    """Upsert the latest counter values, insert alert events and dead letters; the same SQL in either database."""
    for counter in counters:
        if isinstance(counter, BucketState):
            conn.execute(_UPSERT_BUCKET, (counter.token_name, counter.tokens, counter.updated_at))
        elif isinstance(counter, BudgetState):
            conn.execute(_UPSERT_BUDGET, dataclasses.astuple(counter))
        elif isinstance(counter, AlertEvent):
            insert_alert_event(conn, counter)
        elif isinstance(counter, MonthlyCount):
            conn.execute(_UPSERT_MONTH, (counter.token_name, counter.month, counter.requests))
    if dead_letters:
        conn.executemany(_INSERT_DEAD, [(d.ts, d.error, d.row) for d in dead_letters])


class SQLiteBackend:
    """Writes batches into one SQLite connection, owned by the writer thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def write(self, records: Sequence[RequestRecord], counters: Sequence[Counter],
              dead_letters: Sequence[DeadLetter] = ()) -> None:
        """Write rows, counters and dead letters in one transaction, or nothing (and raise)."""
        try:
            self._transaction(records, counters, dead_letters)
        except sqlite3.OperationalError:
            self._give_back_space()
            raise

    def is_outage(self, error: Exception) -> bool:
        # OperationalError: full, locked, I/O error, read-only, missing table; a plain DatabaseError: corruption.
        # A closed connection (ProgrammingError) fails every row alike, which the writer tells by writing none.
        return isinstance(error, sqlite3.OperationalError) or type(error) is sqlite3.DatabaseError

    def idle(self) -> bool:
        return False

    def close(self) -> None:
        self._conn.close()

    def _transaction(self, records: Sequence[RequestRecord], counters: Sequence[Counter],
                     dead_letters: Sequence[DeadLetter]) -> None:
        if self._conn.in_transaction:  # a rollback that failed (I/O error) left one open
            self._conn.rollback()
        with self._conn:
            self._conn.execute("BEGIN")
            # One multi-row INSERT per 500 rows: sqlite3 hands the GIL back and forth on every statement,
            # and each hand-off costs the event loop thread time, so fewer statements keep the loop fast.
            for start in range(0, len(records), _ROWS_PER_INSERT):
                chunk = records[start : start + _ROWS_PER_INSERT]
                self._conn.execute(_INSERT + ", ".join([_ROW] * len(chunk)), _params(chunk))
            add_to_hourly(self._conn, records)
            write_counters(self._conn, counters, dead_letters)
            writes = [item for item in counters if isinstance(item, CacheWrite)]
            touches = [item for item in counters if isinstance(item, CacheTouch)]
            if writes or touches:
                write_cache(self._conn, writes, touches)

    def _give_back_space(self) -> None:
        """After a failed write (a full disk, typically): shrink the WAL so that freed space is not eaten again."""
        with contextlib.suppress(sqlite3.Error):  # the next attempt will say what is wrong
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _params(records: Iterable[RequestRecord]) -> list:
    return [getattr(record, name) for record in records for name in COLUMNS]
