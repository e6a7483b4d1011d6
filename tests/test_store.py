"""The writer batches rows off the caller's thread, flushes on close, and loses nothing when the disk is full."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from metrion_addon import store
from metrion_addon.store import BucketState, MonthlyCount, RequestRecord, Writer


def record(n: int = 0, **fields: object) -> RequestRecord:
    return RequestRecord(ts=f"2026-11-24T10:00:{n % 60:02d}.000Z", token_name="app", requester=None,
                         provider="openai", model="gpt-4o", path="/api/proxy/openai/v1/chat/completions",
                         method="POST", stream=False, status=200, input_tokens=n, **fields)


def open_db(path: Path) -> sqlite3.Connection:
    conn = store.connect(path)
    store.create_schema(conn)
    return conn


def count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]


def test_schema_is_idempotent_and_indexed(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "m.db")
    store.create_schema(conn)
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(requests)")}
    assert {"idx_requests_ts", "idx_requests_token_name_ts", "idx_requests_provider_ts",
            "idx_requests_model_ts"} <= indexes
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_database_from_an_older_metrion_gains_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, ts TEXT NOT NULL, provider TEXT NOT NULL, "
                    "path TEXT NOT NULL, method TEXT NOT NULL, stream INTEGER NOT NULL, usage_source TEXT NOT NULL)")
        old.execute("INSERT INTO requests (ts, provider, path, method, stream, usage_source) "
                    "VALUES ('2026-01-01T00:00:00.000Z', 'openai', '/v1/x', 'POST', 0, 'none')")
    conn = open_db(path)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    assert set(store.COLUMNS) <= columns
    writer = Writer(store.SQLiteBackend(conn))
    writer.start()
    writer.put(record(7))
    writer.close()
    assert count(path) == 2


def test_rows_and_counters_are_written_and_flushed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    priced: list[RequestRecord] = []
    writer = Writer(store.SQLiteBackend(open_db(path)), price=lambda r: (0.5, "test"), on_written=priced.extend)
    writer.start()
    for n in range(500):
        writer.put(record(n))
    writer.put(BucketState("app", 3.5, 10.0))
    writer.put(BucketState("app", 2.5, 11.0))
    writer.put(MonthlyCount("app", "2026-11", 7))
    writer.close()
    assert count(path) == 500 and len(priced) == 500
    conn = open_db(path)
    assert store.load_counters(conn) == ([BucketState("app", 2.5, 11.0)], [MonthlyCount("app", "2026-11", 7)])
    row = conn.execute("SELECT cost_usd, price_source, stream, input_tokens FROM requests WHERE id = 500").fetchone()
    assert row == (0.5, "test", 0, 499)


def test_rows_are_visible_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    writer = Writer(store.SQLiteBackend(open_db(path)))
    writer.start()
    writer.put(record())
    deadline = time.monotonic() + 1
    while count(path) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count(path) == 1
    writer.close()


def test_put_never_waits_for_the_database(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    writer = Writer(store.SQLiteBackend(open_db(path)), retry_seconds=0.05)
    writer.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer's next transaction must wait for this one
    writer.put(record(1))
    time.sleep(0.1)
    started = time.perf_counter()
    for n in range(1000):
        writer.put(record(n))
    assert time.perf_counter() - started < 0.5  # queued, not written: the caller never waits on SQLite
    blocker.execute("ROLLBACK")
    writer.close()
    assert count(path) == 1001


def test_full_disk_keeps_rows_and_writes_them_once_there_is_room(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    conn = open_db(path)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite now answers SQLITE_FULL, as on a full disk
    written = threading.Event()
    writer = Writer(store.SQLiteBackend(conn), on_written=lambda rows: written.set(), retry_seconds=0.05)
    writer.start()
    for n in range(200):
        writer.put(record(n, error="x" * 500))
    deadline = time.monotonic() + 5
    while writer.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not writer.healthy and "full" in (writer.error or "")
    assert not written.is_set()
    conn.execute("PRAGMA max_page_count = 1073741823")  # room again (this connection is the writer's own)
    assert written.wait(5)
    writer.close()
    assert count(path) == 200 and writer.healthy


@pytest.mark.parametrize("name", ["ts", "token_name", "model", "cost_usd", "price_source", "usage_source"])
def test_columns_are_the_documented_ones(tmp_path: Path, name: str) -> None:
    columns = {row[1] for row in open_db(tmp_path / "m.db").execute("PRAGMA table_info(requests)")}
    assert name in columns and "flow_id" not in columns


def test_budget_snapshots_keep_the_latest_version_whatever_order_they_arrive_in(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    settled = store.BudgetState("app", "2026-11", 900, 0, 7)
    writer = Writer(store.SQLiteBackend(open_db(path)), settle=lambda row: settled if row.flow_id == "f1" else None)
    writer.start()
    writer.put(record(1, flow_id="f1"))  # its settlement is written in the row's own transaction
    writer.close()
    writer = Writer(store.SQLiteBackend(open_db(path)))
    writer.start()
    writer.put(store.BudgetState("app", "2026-11", 0, 500, 6))  # an older reservation snapshot, late
    writer.put(store.BudgetState("app", "2026-12", 10, 0, 8))
    writer.close()
    saved = sorted(store.load_budgets(open_db(path)), key=lambda state: state.month)
    assert saved == [settled, store.BudgetState("app", "2026-12", 10, 0, 8)]
