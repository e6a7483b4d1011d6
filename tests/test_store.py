"""The writer batches rows off the caller's thread, never dies over a value, isolates bad rows, survives outages."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metrion_addon import store
from metrion_addon.store import BucketState, BudgetState, MonthlyCount, RequestRecord, Writer, storable


def record(n: int = 0, **fields: Any) -> RequestRecord:
    defaults: dict[str, Any] = dict(
        ts=f"2026-11-24T10:00:{n % 60:02d}.000Z", token_name="app", requester=None, provider="openai",
        model="gpt-4o", path="/api/proxy/openai/v1/chat/completions", method="POST", stream=False, status=200,
        input_tokens=n)
    return RequestRecord(**{**defaults, **fields})


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


def test_a_row_whose_budget_waits_for_it_settles_at_once_and_is_still_written_with_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    settled: list[tuple[int, float]] = []
    writer = Writer(store.SQLiteBackend(open_db(path)), batch_seconds=1.5, settles_now=lambda r: r.flow_id == "b",
                    settle=lambda r: settled.append((r.input_tokens, time.monotonic())) and None)
    writer.start()
    writer.put(record(1, flow_id="a"))  # opens a 1.5 s batch window
    time.sleep(0.1)
    put = time.monotonic()
    writer.put(record(2, flow_id="b"))
    deadline = time.monotonic() + 1
    while len(settled) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [n for n, _ in settled] == [1, 2] and settled[1][1] - put < 0.7  # not at the end of the window
    assert count(path) == 0  # the rows are still written together, when the window closes
    writer.close()
    assert count(path) == 2


def test_a_durable_counter_is_committed_at_once_and_on_disk_when_its_future_is_done(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    writer = Writer(store.SQLiteBackend(open_db(path)), batch_seconds=5.0)
    writer.start()
    writer.put(record(1))  # opens a 5 s batch window
    time.sleep(0.05)
    started = time.monotonic()
    writer.put_durable(BudgetState("app", "2026-12", 7, 3, 1)).result(timeout=2)
    assert time.monotonic() - started < 1.0  # the window ended for it
    with sqlite3.connect(path) as conn:
        assert store.load_budgets(conn) == [BudgetState("app", "2026-12", 7, 3, 1)]
    assert count(path) == 1  # what was queued before it went in the same commit
    writer.close()


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
    assert writer.healthy
    writer.close()
    assert count(path) == 200


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


# the writer never dies and never lies

TEXT_FIELDS = ("requester", "model", "path", "error", "token_name")


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(alphabet=st.characters(codec=None)), min_size=len(TEXT_FIELDS),
                      max_size=len(TEXT_FIELDS)))
def test_any_text_is_stored_with_bad_characters_replaced_and_good_ones_kept(texts: list[str]) -> None:
    conn = open_db(Path(":memory:"))
    store.SQLiteBackend(conn).write([storable(record(**dict(zip(TEXT_FIELDS, texts, strict=True))))], [], [])
    stored = conn.execute(f"SELECT {', '.join(TEXT_FIELDS)} FROM requests").fetchone()
    for text, value in zip(texts, stored, strict=True):
        assert value == text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        if not any("\ud800" <= c <= "\udfff" for c in text):
            assert value == text  # nothing that could be stored is changed


@pytest.mark.parametrize(("field", "value", "stored"), [
    ("requester", "caf\udce9", "caf\ufffd"),  # the byte \xe9 of a header, decoded with surrogateescape
    ("path", "/api/proxy/openai/v1/\udcff", "/api/proxy/openai/v1/\ufffd"),  # a raw \xff in the path
    ("model", "gpt-4o\ud800", "gpt-4o\ufffd"),  # "\ud800" escaped in a JSON body
    ("model", "\ud83d\ude00", "😀"),  # a surrogate pair is one character, not two bad ones
    ("model", {"not": "text"}, "{'not': 'text'}"),
    ("input_tokens", 10**30, None),
    ("input_tokens", "12", 12),
    ("latency_ms", float("inf"), None),
])
def test_every_value_is_made_storable_at_the_boundary(tmp_path: Path, field: str, value: object,
                                                      stored: object) -> None:
    path = tmp_path / "m.db"
    writer = Writer(store.SQLiteBackend(open_db(path)), batch_seconds=0)
    writer.start()
    writer.put(record(1, **{field: value}))
    writer.put(record(2))
    writer.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute(f"SELECT {field}, error FROM requests ORDER BY id").fetchall()
    assert [row[0] for row in rows] == [stored, 2 if field == "input_tokens" else record(2).__dict__[field]]
    if stored is None:
        assert "not storable" in rows[0][1]


def test_a_row_the_database_refuses_becomes_a_dead_letter_and_the_rest_of_its_batch_lands(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    conn = open_db(path)
    conn.execute("CREATE TRIGGER poison BEFORE INSERT ON requests WHEN NEW.model = 'poison' "
                 "BEGIN SELECT RAISE(ABORT, 'poison row'); END")
    writer = Writer(store.SQLiteBackend(conn), batch_seconds=0.2)
    writer.start()
    for n in range(50):
        writer.put(record(n, model="poison" if n == 17 else "gpt-4o"))
    writer.put(MonthlyCount("app", "2026-11", 50))
    deadline = time.monotonic() + 5
    while count(path) < 49 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.healthy and writer.dead_letters == 1
    writer.close()
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT count(*), sum(model = 'poison') FROM requests").fetchone() == (49, 0)
        assert check.execute("SELECT requests FROM monthly_usage").fetchone() == (50,)
        ts, error, row = check.execute("SELECT ts, error, row FROM dead_letters").fetchone()
    assert "poison row" in error and json.loads(row)["input_tokens"] == 17 and ts == record(17).ts


def test_the_writer_survives_its_own_failures_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "m.db"

    class Flaky(store.SQLiteBackend):
        failures = 2

        def is_outage(self, error: Exception) -> bool:
            if Flaky.failures:  # a bug in the writer's own path, not in a row or the database
                Flaky.failures -= 1
                raise RuntimeError("classification failed")
            return super().is_outage(error)

    conn = open_db(path)
    conn.execute("CREATE TRIGGER poison BEFORE INSERT ON requests WHEN NEW.model = 'poison' "
                 "BEGIN SELECT RAISE(ABORT, 'poison row'); END")

    def explode(records: list[RequestRecord]) -> None:
        raise RuntimeError("the UI callback failed")

    writer = Writer(Flaky(conn), on_written=explode, retry_seconds=0.05, batch_seconds=0)
    writer.start()
    writer.put(record(1, model="poison"))
    for n in range(2, 12):
        writer.put(record(n))
    deadline = time.monotonic() + 5
    while (count(path) < 10 or not writer.healthy) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.healthy and count(path) == 10 and writer.dead_letters == 1
    writer.close()


def test_healthy_means_rows_are_being_written_now(tmp_path: Path) -> None:
    release = threading.Event()

    class Stuck(store.SQLiteBackend):
        def write(self, *args: Any) -> None:
            release.wait(10)
            super().write(*args)

    path = tmp_path / "m.db"
    writer = Writer(Stuck(open_db(path)), batch_seconds=0, stall_seconds=0.3)
    assert not writer.healthy and "not running" in (writer.trouble or "")
    writer.start()
    assert writer.healthy
    writer.put(record(1))
    time.sleep(0.5)
    assert not writer.healthy and "stuck" in (writer.trouble or "")
    release.set()
    deadline = time.monotonic() + 5
    while not writer.healthy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.healthy and count(path) == 1
    writer.close()
    assert not writer.healthy


def test_an_outage_keeps_forwarded_rows_counts_rejections_and_bounds_the_rest(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.db"
    conn = open_db(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the database is locked: every write fails after busy_timeout
    conn.execute("PRAGMA busy_timeout = 10")
    writer = Writer(store.SQLiteBackend(conn), retry_seconds=0.05, batch_seconds=0, backlog_rows=100)
    writer.start()
    writer.put(record(0))
    deadline = time.monotonic() + 5
    while writer.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "locked" in (writer.trouble or "")
    for n in range(30):  # refused by Metrion while it could not write: counted, no row
        writer.put(record(n, forwarded=False, status=503))
    for n in range(300):  # in flight when the outage began: every one is kept, past the backlog bound too
        writer.put(record(n, status=200))
    time.sleep(0.2)
    assert writer.rejected_while_failing == 30
    with caplog.at_level(logging.ERROR):
        writer.close(timeout=5)
    assert ("301 request rows (301 of forwarded requests), 0 counter updates and 0 dead letters could not be "
            "written; 0 unforwarded rows were dropped past the backlog limit and 30 requests refused while "
            "failing left no row") in caplog.text
    blocker.execute("ROLLBACK")


def test_unforwarded_rows_past_the_backlog_bound_are_counted_and_dropped(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    conn = open_db(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    conn.execute("PRAGMA busy_timeout = 10")
    writer = Writer(store.SQLiteBackend(conn), retry_seconds=0.05, batch_seconds=0, backlog_rows=100)
    writer.start()
    for n in range(150):  # put before the writer noticed: a 401 flood, say, queued as rows
        writer._queue.put(record(n, forwarded=False, status=401))
    deadline = time.monotonic() + 5
    while writer.dropped < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.dropped == 50
    blocker.execute("ROLLBACK")
    deadline = time.monotonic() + 5
    while count(path) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.close()
    assert count(path) == 100


def test_a_large_backlog_is_written_in_small_transactions_once_there_is_room(tmp_path: Path) -> None:
    sizes: list[int] = []

    class Counting(store.SQLiteBackend):
        def write(self, records: Any, counters: Any, dead: Any) -> None:
            super().write(records, counters, dead)
            sizes.append(len(records))

    path = tmp_path / "m.db"
    conn = open_db(path)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    writer = Writer(Counting(conn), retry_seconds=0.05, batch_seconds=0)
    writer.start()
    for n in range(20_000):
        writer.put(record(n, error="x" * 200))
    deadline = time.monotonic() + 5
    while writer.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not writer.healthy
    conn.execute("PRAGMA max_page_count = 1073741823")
    deadline = time.monotonic() + 30
    while count(path) < 20_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(path) == 20_000 and writer.healthy
    assert max(sizes) <= store.writer.CHUNK_ROWS
    writer.close()


def test_a_second_claim_on_a_database_names_the_process_that_holds_it(tmp_path: Path) -> None:
    database = tmp_path / "m.db"
    held = store.claim(database)
    with pytest.raises(store.DatabaseInUse, match=rf"m\.db is in use by another Metrion process \(pid {os.getpid()}\)"):
        store.claim(database)
    held.release()
    store.claim(database).release()  # free again once released
