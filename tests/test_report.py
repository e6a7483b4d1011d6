"""Tests for the read-side queries: grouped reports with nearest-rank latency percentiles, logs and quotas."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metrion_addon import store
from metrion_addon.config import load_config
from metrion_addon.report import LogFilter, logs, nearest_rank, parse_since, parse_status, quota, report
from metrion_addon.store import RequestRecord

NOW = datetime(2026, 11, 24, 20, 32, 29, 123000, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent


def row(ts: str, model: str = "gpt-4o", status: int | None = 200, latency: float | None = 100.0, **fields) -> tuple:
    record = RequestRecord(
        ts=ts, token_name=fields.pop("token_name", "app"), requester=fields.pop("requester", None),
        provider=fields.pop("provider", "openai"), model=model, path="/v1/chat/completions", method="POST",
        stream=False, status=status, latency_ms=latency, **fields,
    )
    return tuple(getattr(record, name) for name in store.COLUMNS)


def seeded(rows: list[tuple]) -> sqlite3.Connection:
    conn = store.connect(":memory:")
    store.create_schema(conn)
    placeholders = ", ".join("?" * len(store.COLUMNS))
    conn.executemany(f"INSERT INTO requests ({', '.join(store.COLUMNS)}) VALUES ({placeholders})", rows)
    return conn


@pytest.fixture
def conn() -> sqlite3.Connection:
    rows = [  # gpt-4o: latencies 1..20 ms on 11-20; claude: 3 rows on 11-21, one error of each kind
        row(f"2026-11-20T10:00:{i:02d}.000Z", latency=float(i), input_tokens=100, output_tokens=10,
            cache_read_tokens=40, cost_usd=0.01, token_name="a")
        for i in range(1, 21)
    ] + [
        row("2026-11-21T09:00:00.000Z", "claude-sonnet-4", 500, 300.0, provider="anthropic", token_name="b"),
        row("2026-11-21T09:00:01.000Z", "claude-sonnet-4", None, None, provider="anthropic", error="reset",
            token_name="b"),
        row("2026-11-21T09:00:02.000Z", "claude-sonnet-4", 200, 100.0, provider="anthropic", error="cut short",
            token_name="b", requester="alice"),
        row("2026-11-21T09:00:03.000Z", "my-model", 404, 50.0, provider="openai", token_name="b"),
    ]
    return seeded(rows)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", "2026-11-17T20:32:29.123Z"),
        ("24h", "2026-11-23T20:32:29.123Z"),
        ("30m", "2026-11-24T20:02:29.123Z"),
        (" 0d ", "2026-11-24T20:32:29.123Z"),
        ("2026-11-01", "2026-11-01T00:00:00.000Z"),
        ("2026-11-01T12:00:00", "2026-11-01T12:00:00.000Z"),
        ("2026-11-01T12:00:00Z", "2026-11-01T12:00:00.000Z"),
        ("2026-11-01T12:00:00.5+02:00", "2026-11-01T10:00:00.500Z"),
    ],
)
def test_since_accepts_relative_spans_dates_and_iso_times_as_utc(text: str, expected: str) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "7w", "", "-7d", "d7", "2026-13-01", "7 d"])
def test_since_rejects_anything_else_with_a_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a time: .* \(expected 7d, 24h, 30m"):
        parse_since(text, NOW)


@pytest.mark.parametrize(("text", "expected"), [("429", (429, 429)), ("4xx", (400, 499)), ("5XX", (500, 599))])
def test_status_filter_is_a_code_or_a_class(text: str, expected: tuple[int, int]) -> None:
    assert parse_status(text) == expected


@pytest.mark.parametrize("text", ["4x", "600", "error", "", "42"])
def test_status_filter_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a status"):
        parse_status(text)


@pytest.mark.parametrize(
    ("values", "p50", "p95"),
    [
        ([5.0], 5.0, 5.0),
        ([1.0, 2.0], 1.0, 2.0),
        ([float(i) for i in range(1, 21)], 10.0, 19.0),
        ([float(i) for i in range(1, 101)], 50.0, 95.0),
        ([float(i) for i in range(1, 102)], 51.0, 96.0),
    ],
)
def test_percentiles_are_nearest_rank(values: list[float], p50: float, p95: float) -> None:
    assert (nearest_rank(values, 50), nearest_rank(values, 95)) == (p50, p95)


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1), st.integers(1, 100))
def test_nearest_rank_is_the_smallest_value_with_at_least_p_percent_at_or_below_it(
    values: list[float], percent: int
) -> None:
    ordered = sorted(values)
    value = nearest_rank(ordered, percent)

    assert sum(v <= value for v in ordered) * 100 >= percent * len(ordered)
    assert sum(v < value for v in ordered) * 100 < percent * len(ordered)


def test_report_by_model_counts_errors_tokens_cost_and_latency(conn: sqlite3.Connection) -> None:
    rows = {r["model"]: r for r in report(conn, None, None, ["model"])}

    assert rows["gpt-4o"] == {
        "model": "gpt-4o", "requests": 20, "errors": 0, "error_rate": 0.0, "input_tokens": 2000,
        "output_tokens": 200, "cached_tokens": 800, "cost_usd": pytest.approx(0.2),
        "latency_p50_ms": 10.0, "latency_p95_ms": 19.0,
    }
    claude = rows["claude-sonnet-4"]
    assert (claude["requests"], claude["errors"], claude["error_rate"]) == (3, 3, 1.0)  # 500, NULL, error text
    assert claude["cost_usd"] is None  # unknown cost stays unknown, not $0
    assert (claude["latency_p50_ms"], claude["latency_p95_ms"]) == (100.0, 300.0)  # the NULL latency is left out


def test_report_lists_the_busiest_group_first_and_days_in_date_order(conn: sqlite3.Connection) -> None:
    assert [r["model"] for r in report(conn, None, None, ["model"])] == ["gpt-4o", "claude-sonnet-4", "my-model"]
    assert [r["day"] for r in report(conn, None, None, ["day"])] == ["2026-11-20", "2026-11-21"]


def test_report_groups_by_several_columns(conn: sqlite3.Connection) -> None:
    rows = report(conn, None, None, ["provider", "status", "provider"])

    assert [(r["provider"], r["status"], r["requests"]) for r in rows] == [
        ("openai", 200, 20), ("anthropic", None, 1), ("anthropic", 200, 1), ("anthropic", 500, 1), ("openai", 404, 1),
    ]
    assert list(rows[0])[:2] == ["provider", "status"]


@pytest.mark.parametrize(
    ("since", "until", "requests"),
    [
        (None, None, 24),
        ("2026-11-21T00:00:00.000Z", None, 4),
        (None, "2026-11-21T00:00:00.000Z", 20),
        ("2026-11-20T10:00:05.000Z", "2026-11-20T10:00:10.000Z", 5),  # since inclusive, until exclusive
    ],
)
def test_report_without_grouping_totals_the_time_range(
    conn: sqlite3.Connection, since: str | None, until: str | None, requests: int
) -> None:
    [total] = report(conn, since, until, [])

    assert total["requests"] == requests


def test_report_of_an_empty_range_has_no_rows(conn: sqlite3.Connection) -> None:
    assert report(conn, "2027-01-01T00:00:00.000Z", None, []) == []
    assert report(conn, "2027-01-01T00:00:00.000Z", None, ["model"]) == []


def test_report_refuses_an_unknown_grouping(conn: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="cannot group by 'colour'"):
        report(conn, None, None, ["model", "colour"])


@pytest.mark.parametrize(
    ("filters", "expected_ts_suffixes"),
    [
        (LogFilter(), ["09:00:03", "09:00:02", "09:00:01"]),
        (LogFilter(token="a"), ["10:00:20", "10:00:19", "10:00:18"]),
        (LogFilter(provider="anthropic"), ["09:00:02", "09:00:01", "09:00:00"]),
        (LogFilter(model="my-model"), ["09:00:03"]),
        (LogFilter(status=(400, 499)), ["09:00:03"]),
        (LogFilter(status=(500, 500)), ["09:00:00"]),
        (LogFilter(requester="alice"), ["09:00:02"]),
        (LogFilter(provider="openai", token="b"), ["09:00:03"]),
        (LogFilter(model="nobody"), []),
    ],
)
def test_logs_show_the_latest_matching_rows_newest_first(
    conn: sqlite3.Connection, filters: LogFilter, expected_ts_suffixes: list[str]
) -> None:
    rows = logs(conn, 3, filters)

    assert [r["ts"][11:19] for r in rows] == expected_ts_suffixes


def test_logs_model_filter_matches_the_model_asked_for_or_answered() -> None:
    conn = seeded([
        row("2026-11-21T09:00:00.000Z", "gpt-4o-2024-08-06", requested_model="gpt-4o"),
        row("2026-11-21T09:00:01.000Z", "gpt-4o", 429, requested_model="gpt-4o"),
        row("2026-11-21T09:00:02.000Z", "gpt-4o-mini-2024-07-18", requested_model="gpt-4o-mini"),
    ])
    assert [r["status"] for r in logs(conn, 10, LogFilter(model="gpt-4o"))] == [429, 200]
    assert [r["requested_model"] for r in logs(conn, 10, LogFilter(model="gpt-4o-2024-08-06"))] == ["gpt-4o"]


def test_logs_rows_carry_every_stored_column(conn: sqlite3.Connection) -> None:
    [latest] = logs(conn, 1, LogFilter())

    assert set(store.COLUMNS) <= set(latest)
    assert latest["stream"] is False
    assert latest["status"] == 404


@pytest.fixture
def config(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "plans:\n  free: {monthly_requests: 100}\n  pro: {monthly_requests: null}\n"
        "tokens:\n"
        f"  - {{name: a, token: sk-metrion-{'a' * 32}, plan: free}}\n"
        f"  - {{name: b, token: sk-metrion-{'b' * 32}, plan: pro}}\n"
        f"  - {{name: c, token: sk-metrion-{'c' * 32}, plan: free}}\n",
        encoding="utf-8",
    )
    return load_config(path, environ={})


@pytest.mark.parametrize(
    ("now", "month", "resets"),
    [
        (datetime(2026, 11, 24, 20, 0, tzinfo=UTC), "2026-11", "2026-12-01"),
        (datetime(2026, 12, 31, 23, 59, tzinfo=UTC), "2026-12", "2027-01-01"),
    ],
)
def test_quota_shows_this_utc_months_use_against_the_plan_cap(config, now: datetime, month: str, resets: str) -> None:
    conn = seeded([])
    conn.executemany(
        "INSERT INTO monthly_usage VALUES (?, ?, ?)",
        [("a", month, 40), ("b", month, 7), ("c", month, 250), ("a", "2020-01", 99)],
    )

    rows = quota(conn, config, now)

    assert [(r["token"], r["plan"], r["requests"], r["cap"], r["remaining"]) for r in rows] == [
        ("a", "free", 40, 100, 60), ("b", "pro", 7, None, None), ("c", "free", 250, 100, 0),
    ]
    assert {(r["month"], r["resets"]) for r in rows} == {(month, resets)}


def test_quota_for_one_token_and_for_an_unknown_one(config) -> None:
    conn = seeded([])

    assert [r["token"] for r in quota(conn, config, NOW, "b")] == ["b"]
    assert quota(conn, config, NOW, "a")[0]["requests"] == 0
    with pytest.raises(ValueError, match="no token named 'zed'"):
        quota(conn, config, NOW, "zed")


def test_benchmark_runs_on_a_tiny_database() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_report.py"), "--rows", "2000", "--runs", "2"],
        capture_output=True, text=True, timeout=120, check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "seeded 2,000 rows" in result.stdout
    assert "median" in result.stdout
