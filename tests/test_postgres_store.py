"""The PostgreSQL log on a real server: batches written once whatever happens, the spool, and one query layer whose
answers on PostgreSQL equal SQLite's for the same rows."""

from __future__ import annotations

import dataclasses
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from harness import free_port

from metrion_addon import alerts, report, store
from metrion_addon.cli import main
from metrion_addon.config import load_config
from metrion_addon.dashboard import pages
from metrion_addon.queries import Cursor, Filters, log_page
from metrion_addon.store import BucketState, DeadLetter, MonthlyCount, RequestRecord
from metrion_addon.store.cache import cache_stats
from metrion_addon.store.records import uuid7
from metrion_addon.store.spool import Batch, Spool, SpoolingBackend, SpoolUnavailable, decode, encode


@pytest.mark.parametrize(("sqlite", "psycopg"), [
    ("SELECT a FROM t WHERE b = ? AND c < ?", "SELECT a FROM t WHERE b = %s AND c < %s"),
    ("SELECT count(*) FILTER (WHERE x > :now) FROM t", "SELECT count(*) FILTER (WHERE x > %(now)s) FROM t"),
    ("SELECT '?', ':no', 'it''s ?', ? FROM t", "SELECT '?', ':no', 'it''s ?', %s FROM t"),
    ("SELECT a % 2, '50%' FROM t", "SELECT a %% 2, '50%%' FROM t"),
    ("SELECT x::bigint FROM t", "SELECT x::bigint FROM t"),
])
def test_sqlite_placeholders_become_psycopg_ones_outside_string_literals(sqlite: str, psycopg: str) -> None:
    assert store.postgres.translate(sqlite) == psycopg


def test_a_spooled_batch_reads_back_as_it_was_written() -> None:
    batch = Batch([record(1, error="bad \x00 byte", stream=True), record(2, cost_usd=None)],
                  [BucketState("app", 2.5, 1.0), MonthlyCount("app", "2026-11", 3)],
                  [DeadLetter("2026-11-01T00:00:00.000Z", "IntegrityError: no", '{"ts": 1}')])
    again = decode(encode(batch))
    assert again == batch and [r.uid for r in again.records] == [r.uid for r in batch.records]


def record(n: int, **fields: Any) -> RequestRecord:
    base = dict(ts=f"2026-11-0{1 + n % 3}T{n % 24:02d}:{n % 60:02d}:00.000Z", token_name="app", requester=None,
                provider="openai", model="gpt-4o", path="/v1/chat/completions", method="POST", stream=False,
                status=200, input_tokens=10, output_tokens=5, total_tokens=15, latency_ms=100.0 + n, ttfb_ms=50.0,
                usage_source="provider", cost_usd=0.0001 * n, price_source="test", uid=uuid7())
    return RequestRecord(**{**base, **fields})


def pg(server, name: str) -> tuple[str, store.postgres.Connection]:
    url = server.create_database(name)
    conn = store.postgres.connect(url)
    store.postgres.create_schema(conn)
    return url, conn


def test_a_batch_written_twice_is_stored_and_aggregated_once(postgres) -> None:
    url, conn = pg(postgres, "twice")
    backend = store.postgres.PostgresBackend(url)
    batch = [record(n) for n in range(5)]
    backend.write(batch, [])
    backend.write([*batch, record(7)], [])  # a retry after a lost commit acknowledgement, with one new row
    assert conn.execute("SELECT count(*), count(DISTINCT uid) FROM requests").fetchone() == (6, 6)
    assert conn.execute("SELECT sum(requests) FROM hourly_usage").fetchone() == (6,)
    assert conn.execute("SELECT sum(requests) FROM daily_usage").fetchone() == (6,)
    backend.close()


def test_schema_creation_is_idempotent(postgres) -> None:
    _, conn = pg(postgres, "schema")
    store.postgres.create_schema(conn)
    indexes = {name for (name,) in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'requests'")}
    assert {"idx_requests_ts", "idx_requests_token_name_ts", "idx_requests_uid"} <= indexes


def unreachable() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"


def test_batches_spool_while_postgres_is_unreachable_and_replay_once_when_it_is_back(postgres, tmp_path: Path
                                                                                     ) -> None:
    url, conn = pg(postgres, "spooled")
    down = SpoolingBackend(store.postgres.PostgresBackend(unreachable()), Spool.claim(tmp_path, 1 << 20))
    first, second = [record(n) for n in range(3)], [record(n) for n in range(3, 5)]
    down.write(first, [BucketState("app", 2.5, 1.0)])
    down.write(second, [MonthlyCount("app", "2026-11", 5)])
    assert down.outage is not None and down.spool.rows == 5
    down.close()

    spool_file = tmp_path / "spool-0.jsonl"
    with spool_file.open("ab") as file:
        file.write(b'{"rows": [[')  # a crash mid-append: never fsynced, never acknowledged
    up = SpoolingBackend(store.postgres.PostgresBackend(url), Spool.claim(tmp_path, 1 << 20))
    assert up.spool.rows == 5
    while up.idle():
        pass
    assert up.spool.rows == 0 and up.spool.empty and spool_file.stat().st_size == 0
    up.write(first, [])  # replayed rows are known by their uid: written again, stored once
    assert conn.execute("SELECT count(*), sum(input_tokens) FROM requests").fetchone() == (5, 50)
    assert conn.execute("SELECT sum(requests) FROM hourly_usage").fetchone() == (5,)
    assert conn.execute("SELECT tokens FROM rate_buckets").fetchone() == (2.5,)
    assert conn.execute("SELECT requests FROM monthly_usage").fetchone() == (5,)
    up.close()


def test_past_its_bound_the_spool_refuses_and_the_writer_fails_closed(tmp_path: Path) -> None:
    backend = SpoolingBackend(store.postgres.PostgresBackend(unreachable()), Spool.claim(tmp_path, 4096))
    writer = store.Writer(backend, retry_seconds=0.05, batch_seconds=0)
    writer.start()
    writer.put(record(1))
    deadline = time.monotonic() + 10
    while backend.spool.rows < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert writer.healthy, "spooled rows are safe: the instance keeps metering"
    for n in range(40):
        writer.put(record(n))
    while writer.healthy:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "spool" in (writer.trouble or "") and backend.spool.bytes <= 4096
    assert backend.is_outage(SpoolUnavailable("full"))
    writer.close(timeout=1)


def mixed_rows(count: int) -> list[RequestRecord]:
    """Rows of several tokens, people, providers, models, statuses, days and hours, some failed or unpriced."""
    pick = random.Random(14)
    rows = []
    for n in range(count):
        status = pick.choice([200, 200, 200, 429, 500, None])
        rows.append(record(
            n,
            ts=f"2026-11-{pick.randint(1, 4):02d}T{pick.randint(0, 23):02d}:{pick.randint(0, 59):02d}:"
               f"{pick.randint(0, 59):02d}.{n % 1000:03d}Z",
            token_name=pick.choice(["app", "ci", None]), requester=pick.choice(["ana", "bo", None]),
            provider=pick.choice(["openai", "anthropic"]), model=pick.choice(["gpt-4o", "claude", None]),
            status=status, error=None if status == 200 else "failed",
            input_tokens=pick.randint(0, 5000), output_tokens=pick.randint(0, 800),
            cache_read_tokens=pick.randint(0, 100), stream=pick.random() < 0.5,
            latency_ms=None if status is None else round(pick.uniform(1, 3000), 3),
            ttfb_ms=None if status == 429 else round(pick.uniform(1, 500), 3),
            cost_usd=None if pick.random() < 0.1 else round(pick.uniform(0, 0.05), 9),
            cache_status=pick.choice([None, None, "HIT", "MISS", "REFRESH"]),
        ))
        if rows[-1].cache_status == "HIT":
            rows[-1].saved_usd = round(pick.uniform(0, 0.01), 9)
    for row in rows:  # the name asked for: an alias of the answered one; a failure without a model asked gpt-4o
        row.requested_model = {"gpt-4o": "gpt-4o", "claude": "claude-latest", None: "gpt-4o"}[row.model]
    rows.sort(key=lambda row: row.ts)
    return rows


def same(sqlite_value: Any, postgres_value: Any) -> None:
    """Equal, except that float sums may differ in their last bits (the databases add in their own order)."""
    if isinstance(sqlite_value, dict):
        assert list(sqlite_value) == list(postgres_value)
        for key in sqlite_value:
            same(sqlite_value[key], postgres_value[key])
    elif isinstance(sqlite_value, list | tuple):
        assert type(sqlite_value) is type(postgres_value) and len(sqlite_value) == len(postgres_value)
        for a, b in zip(sqlite_value, postgres_value, strict=True):
            same(a, b)
    elif isinstance(sqlite_value, float):
        assert sqlite_value == pytest.approx(postgres_value, rel=1e-12, abs=1e-12)
    else:
        assert sqlite_value == postgres_value and type(sqlite_value) is type(postgres_value)


def test_the_query_layer_answers_the_same_on_postgres_as_on_sqlite(postgres, tmp_path: Path) -> None:
    rows = mixed_rows(600)
    sqlite_conn = store.connect(tmp_path / "m.db")
    store.create_schema(sqlite_conn)
    counters = [MonthlyCount("app", "2026-11", 9)]
    store.SQLiteBackend(sqlite_conn).write([dataclasses.replace(row) for row in rows], counters)
    url, _ = pg(postgres, "parity")
    store.postgres.PostgresBackend(url).write([dataclasses.replace(row) for row in rows], counters)
    lite = store.read_only(tmp_path / "m.db")
    heavy = store.read_only(url)

    for by in ([], ["token"], ["provider", "model"], ["day"], ["status"], ["requester", "token"], ["day", "model"]):
        for since, until in ((None, None), ("2026-11-02T05:30:00.000Z", "2026-11-03T17:00:00.000Z")):
            same(report.report(lite, since, until, by), report.report(heavy, since, until, by))
    for filters in (report.LogFilter(), report.LogFilter(token="ci", status=(400, 599)),
                    report.LogFilter(model="claude")):
        assert report.logs(lite, 25, filters) == report.logs(heavy, 25, filters)

    config = load_config(_config(tmp_path), need_keys=False)
    now = datetime(2026, 11, 4, 23, 0, tzinfo=UTC)
    assert report.quota(lite, config, now) == report.quota(heavy, config, now)
    f = Filters("2026-11-01T06:15:00.000Z", "2026-11-04T12:45:00.000Z")
    same(pages.overview(lite, f), pages.overview(heavy, f))
    same(pages.latency(lite, f), pages.latency(heavy, f))
    same(pages.errors(lite, f), pages.errors(heavy, f))
    same(pages.costs(lite, f, now), pages.costs(heavy, f, now))
    same(pages.tokens(lite, config, f, now), pages.tokens(heavy, config, f, now))
    same(pages.filter_choices(lite, config, f), pages.filter_choices(heavy, config, f))
    same(pages.logs(lite, f, None, 0), pages.logs(heavy, f, None, 0))
    assert log_page(lite, f, Cursor("2026-11-03T00:00:00.000Z", 10**9, True)) == \
        log_page(heavy, f, Cursor("2026-11-03T00:00:00.000Z", 10**9, True))
    same(alerts.status(lite, config, now.timestamp()), alerts.status(heavy, config, now.timestamp()))
    for since, until in ((None, None), (f.since, f.until)):
        same(cache_stats(lite, now.timestamp(), since, until), cache_stats(heavy, now.timestamp(), since, until))
    for model in ("gpt-4o", "claude-latest"):  # a model filter matches the model answered or the one asked for
        named = dataclasses.replace(f, model=model)
        same(pages.overview(lite, named), pages.overview(heavy, named))
        same(pages.logs(lite, named, None, 0), pages.logs(heavy, named, None, 0))
        same(pages.errors(lite, named), pages.errors(heavy, named))
    lite.close()
    heavy.close()

    on_sqlite = _config(tmp_path)
    on_postgres = tmp_path / "postgres.yaml"
    on_postgres.write_text(on_sqlite.read_text().replace("database: m.db", f"database: {url}")
                           + "shared: {redis: 'redis://127.0.0.1:9/0'}\n")  # the report never asks Redis
    for args in (["report", "--by", "model", "--by", "token"], ["report", "--by", "day", "--since", "2026-11-02"],
                 ["logs", "--limit", "30", "--status", "5xx"]):
        outputs = [CliRunner().invoke(main, [*args, "--format", "csv", "--config", str(path)], catch_exceptions=False)
                   for path in (on_sqlite, on_postgres)]
        assert outputs[0].exit_code == outputs[1].exit_code == 0
        assert outputs[0].output == outputs[1].output and outputs[0].output.count("\n") > 3


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "database: m.db\n"
        "tokens: [{name: app, token: sk-metrion-" + "1" * 32 + ", plan: free}]\n"
        "alerts:\n"
        "  channels: {ops: {webhook: 'http://127.0.0.1:9/hook'}}\n"
        "  rules:\n"
        "    - {name: spend, type: budget, threshold: 1, unit: usd, period: month, notify: [ops]}\n"
        "    - {name: slow, type: latency_p95, threshold: 900, unit: ms, period: month, notify: [ops]}\n"
    )
    return path


def test_a_journal_left_by_a_stopped_instance_is_replayed_by_a_running_one(postgres, tmp_path: Path) -> None:
    url, conn = pg(postgres, "orphan")
    running = SpoolingBackend(store.postgres.PostgresBackend(url), Spool.claim(tmp_path, 1 << 20))
    stopped = SpoolingBackend(store.postgres.PostgresBackend(unreachable()), Spool.claim(tmp_path, 1 << 20))
    stopped.write([record(n) for n in range(4)], [])
    assert stopped.spool.path.name == "spool-1.jsonl" and stopped.spool.rows == 4
    assert not running.idle(), "its slot is held: not an orphan while that instance runs"
    stopped.close()
    running._look_at = 0.0  # (it looks every 30 s)
    while running.idle():
        pass
    assert conn.execute("SELECT count(*) FROM requests").fetchone() == (4,)
    assert (tmp_path / "spool-1.jsonl").stat().st_size == 0
    running.close()
