"""The hourly aggregates always equal the raw rows they summarise: written live, batch by batch, or rebuilt."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrion_addon import aggregates, store
from metrion_addon.store import RequestRecord, Writer

# An independent statement of what hourly_usage (daily_usage) must hold, written against the raw table.
RAW_USAGE = """
SELECT substr(ts, 1, {cut}), provider, coalesce(model, ''), coalesce(requested_model, ''), coalesce(token_name, ''),
       coalesce(requester, ''),
       coalesce(status, 0), (status IS NULL OR status >= 400 OR error IS NOT NULL), ttfb_ms IS NULL,
       count(*), total(input_tokens), total(output_tokens), total(cache_read_tokens), total(cache_write_tokens),
       total(reasoning_tokens), total(total_tokens), total(CAST(cost_usd * 1000000000 + 0.5 AS INTEGER)),
       count(cost_usd), total(CAST(latency_ms * 1000 + 0.5 AS INTEGER)), count(latency_ms),
       total(CAST(ttfb_ms * 1000 + 0.5 AS INTEGER)), count(ttfb_ms)
FROM requests GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
"""
LEVELS = (("hourly", 13), ("daily", 10))


def usage_tables(conn: sqlite3.Connection, level: str = "hourly", cut: int = 13) -> tuple[set, set]:
    raw = {tuple(int(v) if isinstance(v, float) else v for v in row) for row in conn.execute(RAW_USAGE.format(cut=cut))}
    return raw, set(conn.execute(f"SELECT * FROM {level}_usage"))


def latency_tables(conn: sqlite3.Connection, level: str = "hourly", cut: int = 13) -> tuple[dict, dict]:
    raw: dict[tuple, int] = {}
    for ts, provider, model, asked, token, status, latency in conn.execute(
        "SELECT ts, provider, model, requested_model, token_name, status, latency_ms FROM requests"
        " WHERE latency_ms IS NOT NULL"
    ):
        key = (ts[:cut], provider, model or "", aggregates.latency_bucket(latency), asked or "", token or "",
               status or 0)
        raw[key] = raw.get(key, 0) + 1
    return raw, {row[:-1]: row[-1] for row in conn.execute(f"SELECT * FROM {level}_latency")}


records = st.builds(
    RequestRecord,
    ts=st.sampled_from(["2026-11-24T10:", "2026-11-24T11:", "2026-11-25T00:"]).map(lambda h: h + "00:01.000Z"),
    token_name=st.sampled_from([None, "app", "ci"]),
    requester=st.sampled_from([None, "alice", "bob"]),
    provider=st.sampled_from(["openai", "anthropic"]),
    model=st.sampled_from([None, "gpt-4o", "gpt-4o-2024-08-06", "claude-sonnet-4"]),
    requested_model=st.sampled_from([None, "gpt-4o", "claude-sonnet-4"]),
    path=st.just("/api/proxy/openai/v1/chat/completions"),
    method=st.just("POST"),
    stream=st.booleans(),
    status=st.sampled_from([None, 200, 200, 400, 429, 500, 502]),
    input_tokens=st.integers(0, 10**6),
    output_tokens=st.integers(0, 10**6),
    cache_read_tokens=st.integers(0, 1000),
    cache_write_tokens=st.integers(0, 1000),
    reasoning_tokens=st.integers(0, 1000),
    total_tokens=st.integers(0, 2 * 10**6),
    latency_ms=st.none() | st.floats(0, 200_000, allow_nan=False),
    ttfb_ms=st.none() | st.floats(0, 60_000, allow_nan=False),
    error=st.sampled_from([None, "upstream cut the stream"]),
    cost_usd=st.none() | st.floats(0, 50, allow_nan=False),
    price_source=st.just("test"),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(records, max_size=30), max_size=5))
def test_aggregates_written_batch_by_batch_equal_the_raw_rows(tmp_path_factory, batches) -> None:
    path = tmp_path_factory.mktemp("agg") / "m.db"
    conn = store.connect(path)
    store.create_schema(conn)
    writer = Writer(store.SQLiteBackend(conn), batch_seconds=0)
    writer.start()
    for batch in batches:
        for record in batch:
            writer.put(record)
    writer.close()
    with sqlite3.connect(path) as check:
        for level, cut in LEVELS:
            raw, kept = usage_tables(check, level, cut)
            assert kept == raw
            raw_latency, kept_latency = latency_tables(check, level, cut)
            assert kept_latency == raw_latency


def test_a_database_without_aggregates_gets_them_built_from_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # an older Metrion's table: no token, cost or latency columns yet
        old.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, ts TEXT NOT NULL, provider TEXT NOT NULL, "
                    "model TEXT, status INTEGER, path TEXT NOT NULL, method TEXT NOT NULL, stream INTEGER NOT NULL, "
                    "usage_source TEXT NOT NULL)")
        old.executemany(
            "INSERT INTO requests (ts, provider, model, status, path, method, stream, usage_source) "
            "VALUES (?, ?, ?, ?, '/v1/x', 'POST', 0, 'none')",
            [(f"2026-01-0{day}T0{hour}:00:00.000Z", provider, "m", status)
             for day in (1, 2) for hour in (0, 5) for provider, status in (("openai", 200), ("grok", 500))],
        )
    conn = store.connect(path)
    store.create_schema(conn)
    raw, kept = usage_tables(conn)
    assert len(kept) == 8 and kept == raw
    raw, kept = usage_tables(conn, "daily", 10)
    assert len(kept) == 4 and kept == raw
    writer = Writer(store.SQLiteBackend(conn))  # and from then on the writer keeps them up to date
    writer.start()
    writer.put(RequestRecord(ts="2026-01-01T00:30:00.000Z", token_name=None, requester=None, provider="openai",
                             model="m", path="/v1/x", method="POST", stream=False, status=200, latency_ms=12.5))
    writer.close()
    with sqlite3.connect(path) as check:
        for level, cut in LEVELS:
            raw, kept = usage_tables(check, level, cut)
            assert kept == raw
            raw_latency, kept_latency = latency_tables(check, level, cut)
            assert kept_latency == raw_latency
        assert check.execute("SELECT requests FROM hourly_usage WHERE hour = '2026-01-01T00' AND provider = 'openai'"
                             ).fetchone() == (2,)


def test_aggregates_built_for_an_existing_log_equal_those_the_writer_keeps(tmp_path: Path) -> None:
    import random
    import sys
    from datetime import UTC, datetime
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from dashboard_data import rows

    logged = rows(3000, 4, datetime(2026, 11, 20, 12, tzinfo=UTC), random.Random(5))
    live = store.connect(tmp_path / "live.db")
    store.create_schema(live)
    writer = Writer(store.SQLiteBackend(live), batch_seconds=0)
    writer.start()
    for record in logged:
        writer.put(record)
    writer.close()
    rebuilt = sqlite3.connect(tmp_path / "live.db", isolation_level=None)
    kept = {table: set(rebuilt.execute(f"SELECT * FROM {table}")) for table in aggregates.TABLES}
    for table in aggregates.TABLES:
        rebuilt.execute(f"DROP TABLE {table}")
    store.create_schema(rebuilt)
    for table in aggregates.TABLES:
        assert set(rebuilt.execute(f"SELECT * FROM {table}")) == kept[table], table


def test_creating_the_schema_again_does_not_count_rows_twice(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "m.db")
    store.create_schema(conn)
    conn.execute("INSERT INTO requests (ts, provider, path, method, stream, usage_source, status, latency_ms) "
                 "VALUES ('2026-01-01T00:00:00.000Z', 'openai', '/v1/x', 'POST', 0, 'none', 200, 5.0)")
    conn.execute("DROP TABLE daily_latency")  # as if a build was interrupted half-way
    store.create_schema(conn)
    store.create_schema(conn)
    for table in aggregates.TABLES:
        assert conn.execute(f"SELECT sum(requests) FROM {table}").fetchone() == (1,)


@given(st.floats(0, 10**7, allow_nan=False))
def test_a_latency_lies_within_its_buckets_bounds(ms: float) -> None:
    low, high = aggregates.bucket_bounds(aggregates.latency_bucket(ms))
    assert low <= ms < high or (ms < 1 and low == 0)


def test_aggregates_of_an_older_metrion_without_the_model_asked_for_are_rebuilt(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "m.db")
    store.create_schema(conn)
    conn.execute("INSERT INTO requests (ts, provider, model, requested_model, path, method, stream, usage_source, "
                 "status, latency_ms) VALUES ('2026-01-01T00:00:00.000Z', 'openai', 'gpt-4o-2024-08-06', 'gpt-4o', "
                 "'/v1/x', 'POST', 0, 'provider', 200, 5.0)")
    for table in aggregates.TABLES:  # the older shape: keyed without requested_model, counting nothing yet
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"CREATE TABLE {table} ({'day' if table.startswith('daily') else 'hour'} TEXT, model TEXT)")
    store.create_schema(conn)
    raw, kept = usage_tables(conn)
    assert kept == raw and [row[2:4] for row in kept] == [("gpt-4o-2024-08-06", "gpt-4o")]
    raw_latency, kept_latency = latency_tables(conn)
    assert kept_latency == raw_latency and sum(kept_latency.values()) == 1
