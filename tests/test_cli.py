"""Tests for the `metrion` command against a seeded database: output formats, filters, and one-line errors."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import re
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from metrion_addon import store
from metrion_addon.cli import main
from metrion_addon.config import hash_token, load_config
from metrion_addon.store import RequestRecord

MODELS = [
    "gpt-4o-mini",
    "claude-sonnet-4-5-20250929",
    "gemini-2.5-flash",
    "a-very-long-fine-tuned-model-name-for-the-acme-corporation-research-lab",
]


def record(ts: datetime, i: int) -> RequestRecord:
    return RequestRecord(
        ts=ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        token_name=f"team-{i % 3}",
        requester=f"user-{i % 5}",
        provider=["openai", "anthropic", "gemini", "openai"][i % 4],
        model=MODELS[i % 4],
        path="/v1/chat/completions",
        method="POST",
        stream=i % 2 == 0,
        status=[200, 200, 200, 429, 500][i % 5],
        input_tokens=1000 * i,
        output_tokens=100 * i,
        cache_read_tokens=10 * i,
        latency_ms=float(i),
        cost_usd=None if i % 4 == 3 else 0.001 * i,
        error=f"provider: {'Rate limit exceeded' if i % 5 == 3 else 'Internal server error'} " + "details " * 20
        if i % 5 >= 3
        else None,
    )


def write_config(tmp_path: Path, database: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"database: {database}\n"
        "plans:\n  free: {monthly_requests: 100}\n  pro: {monthly_requests: null}\n"
        "tokens:\n"
        + "".join(f"  - {{name: team-{n}, token: sk-metrion-{str(n) * 32}, plan: free}}\n" for n in range(3)),
        encoding="utf-8",
    )
    return path


def seeded(tmp_path: Path, rows: list[RequestRecord]) -> Path:
    """A config whose database holds exactly `rows`."""
    database = tmp_path / "metrion.db"
    conn = store.connect(database)
    store.create_schema(conn)
    placeholders = ", ".join("?" * len(store.COLUMNS))
    conn.executemany(
        f"INSERT INTO requests ({', '.join(store.COLUMNS)}) VALUES ({placeholders})",
        [tuple(getattr(r, name) for name in store.COLUMNS) for r in rows],
    )
    conn.commit()
    conn.close()
    return write_config(tmp_path, database)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    now = datetime.now(UTC)
    path = seeded(tmp_path, [record(now - timedelta(hours=i), i) for i in range(1, 101)])  # one an hour, 100 hours
    conn = sqlite3.connect(tmp_path / "metrion.db")
    conn.execute("INSERT INTO monthly_usage VALUES ('team-0', ?, 30)", (now.strftime("%Y-%m"),))
    conn.commit()
    conn.close()
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_report_table_is_aligned_and_fits_100_columns(config: Path) -> None:
    result = run("report", "--config", str(config), "--by", "model")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model", "req", "err", "err%", "in", "out", "cached", "cost", "p50", "ms", "p95", "ms"]
    assert {len(line) for line in lines} == {100}  # every row ends at the same column, within 100
    assert re.search(r"^a-very-long-fine-tuned-\S+… ", result.stdout, re.MULTILINE)  # cut to fit
    assert re.search(r"gpt-4o-mini\s+25\s+10\s+40\.0%\s+", result.stdout)  # i ≡ 1 mod 4: status 429/500 twice in 5


def test_report_table_with_two_groupings_fits_100_columns(config: Path) -> None:
    result = run("report", "--config", str(config), "--by", "model", "--by", "requester")

    assert result.exit_code == 0, result.output
    assert all(len(line) <= 100 for line in result.stdout.splitlines())


def test_report_json_has_the_numbers_and_exact_percentiles(config: Path) -> None:
    result = run("report", "--config", str(config), "--since", "10h", "--format", "json")

    [total] = json.loads(result.stdout)
    # rows i = 1..9 are within the last 10 hours (row 10 is exactly 10 h old, so it may fall either side)
    assert total["requests"] in (9, 10)
    n = total["requests"]
    assert total["input_tokens"] == 1000 * n * (n + 1) // 2
    assert total["latency_p50_ms"] == float((50 * n + 99) // 100)
    assert total["latency_p95_ms"] == float((95 * n + 99) // 100)


def test_report_csv_is_well_formed_with_one_row_per_group(config: Path) -> None:
    result = run("report", "--config", str(config), "--by", "token", "--by", "status", "--format", "csv")

    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0])[:3] == ["token", "status", "requests"]
    assert len(rows) == 3 * 3  # three tokens × statuses 200, 429, 500
    assert sum(int(r["requests"]) for r in rows) == 100


def test_report_of_a_range_with_no_requests_is_empty_not_an_error(config: Path) -> None:
    result = run("report", "--config", str(config), "--since", "2000-01-01", "--until", "2000-01-02", "--format=json")

    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], 50),
        (["--limit", "5"], 5),
        (["--token", "team-1"], 34),
        (["--provider", "anthropic"], 25),
        (["--model", "gemini-2.5-flash"], 25),
        (["--status", "4xx"], 20),
        (["--status", "500"], 20),
        (["--requester", "user-0", "--limit", "100"], 20),
    ],
)
def test_logs_filter_and_list_newest_first(config: Path, args: list[str], expected: int) -> None:
    result = run("logs", "--config", str(config), "--format", "json", *args)

    rows = json.loads(result.stdout)
    assert len(rows) == expected
    assert [r["ts"] for r in rows] == sorted((r["ts"] for r in rows), reverse=True)


def test_logs_table_and_csv(config: Path) -> None:
    table = run("logs", "--config", str(config), "--limit", "3")
    as_csv = run("logs", "--config", str(config), "--limit", "3", "--format", "csv")

    header = ["time", "token", "requester", "provider", "model", "st", "in", "out", "cost", "ms"]
    assert table.stdout.splitlines()[0].split() == header
    assert all(len(line) <= 100 for line in table.stdout.splitlines())
    assert len(list(csv.DictReader(io.StringIO(as_csv.stdout)))) == 3


def test_logs_table_shows_provider_requester_and_each_error_cut_to_the_width(config: Path) -> None:
    lines = run("logs", "--config", str(config), "--limit", "5").stdout.splitlines()

    # rows i = 1..5, newest first; i = 3 (429) and i = 4 (500) failed, each error on a line below its row
    assert re.match(r"\S+ \S+\s+team-1\s+user-1\s+anthropic\s+claude-\S+\s+200 ", lines[1])
    assert re.match(r"\S+ \S+\s+team-0\s+user-3\s+openai\s+a-very-\S+…\s+429 ", lines[3])
    assert lines[4].startswith("  ↳ provider: Rate limit exceeded details details")
    assert lines[4].endswith("…") and len(lines[4]) == 100
    assert re.match(r"\S+ \S+\s+team-1\s+user-4\s+openai\s+gpt-4o-mini\s+500 ", lines[5])
    assert lines[6].startswith("  ↳ provider: Internal server error")
    assert len(lines) == 1 + 5 + 2


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        (["--since", "5h"], 4),  # rows 1..4 (row 5 is exactly 5 h old: just outside by the time it runs)
        (["--until", "98h"], 3),  # rows 98, 99, 100
        (["--since", "10h", "--until", "5h"], 5),  # rows 5..9
    ],
)
def test_logs_since_and_until_bound_the_rows_like_report(config: Path, window: list[str], expected: int) -> None:
    rows = json.loads(run("logs", "--config", str(config), "--format", "json", "--limit", "100", *window).stdout)
    [total] = json.loads(run("report", "--config", str(config), "--format", "json", *window).stdout)
    anthropic = run("logs", "--config", str(config), "--format", "json", "--provider", "anthropic", *window).stdout

    assert len(rows) == expected == total["requests"]
    assert json.loads(anthropic) == [row for row in rows if row["provider"] == "anthropic"]


def test_report_table_ends_with_a_totals_row_that_json_and_csv_do_not_have(config: Path) -> None:
    table = run("report", "--config", str(config), "--by", "provider", "--by", "status").stdout.splitlines()
    as_json = json.loads(run("report", "--config", str(config), "--by", "provider", "--format", "json").stdout)

    assert re.match(r"total\s+100\s+40\s+40\.0%\s+5\.0M\s+505\.0k\s+50\.5k\s+\$3\.7[78]\s+50\s+95$", table[-1])
    assert len(table) == 1 + 3 * 3 + 1  # header, provider × status groups, total
    assert sum(row["requests"] for row in as_json) == 100 and len(as_json) == 3


@pytest.mark.parametrize(
    ("cost", "shown"),
    [
        (0.000009, "$0.000009"),
        (0.0009750000000000001, "$0.000975"),
        (0.00012345, "$0.000123"),
        (0.1, "$0.10"),
        (0.5, "$0.50"),
        (0.123456, "$0.123"),
        (0.0, "$0.00"),
        (3.14159, "$3.14"),
        (1234.567, "$1,234.57"),
        (None, "-"),
    ],
)
def test_costs_print_with_enough_digits_to_tell_small_requests_apart(
    tmp_path: Path, cost: float | None, shown: str
) -> None:
    config = seeded(tmp_path, [replace(record(datetime.now(UTC), 1), cost_usd=cost)])

    [_, line] = run("logs", "--config", str(config)).stdout.splitlines()

    assert line.split()[-2] == shown


def test_json_and_csv_have_no_float_noise(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    rows = [replace(record(now, i), cost_usd=cost, latency_ms=cost) for i, cost in enumerate([0.1, 0.2])]
    config = seeded(tmp_path, rows)

    as_json = run("report", "--config", str(config), "--format", "json").stdout
    as_csv = run("report", "--config", str(config), "--format", "csv").stdout

    assert json.loads(as_json)[0]["cost_usd"] == 0.3
    assert "0.30000000000000004" not in as_json + as_csv
    assert ",0.3," in as_csv


def test_version_prints_the_package_version() -> None:
    result = run("--version")

    assert result.stdout == f"metrion {importlib.metadata.version('metrion')}\n"


def test_quota_shows_plan_use_cap_remaining_and_reset(config: Path) -> None:
    result = run("quota", "--config", str(config), "team-0", "--format", "json")

    [row] = json.loads(result.stdout)
    today = datetime.now(UTC).date()
    assert (row["plan"], row["requests"], row["cap"], row["remaining"]) == ("free", 30, 100, 70)
    assert row["resets"] == (today.replace(day=28) + timedelta(days=4)).replace(day=1).isoformat()
    assert "team-2" in run("quota", "--config", str(config)).stdout


def test_tokens_new_prints_a_fresh_token_once_and_the_config_entry(config: Path, tmp_path: Path) -> None:
    first = run("tokens", "new", "--config", str(config), "--name", "ci bot", "--plan", "pro")
    second = run("tokens", "new", "--config", str(config), "--name", "ci bot")

    token = first.stdout.splitlines()[0]
    assert re.fullmatch(r"sk-metrion-[0-9a-f]{32}", token)
    assert first.stdout.count(token) == 1
    assert second.stdout.splitlines()[0] != token
    [entry] = yaml.safe_load(first.stdout.split("config:\n", 1)[1])
    assert entry == {"name": "ci bot", "token": f"sha256:{hash_token(token)}", "plan": "pro"}
    pasted = tmp_path / "pasted.yaml"
    pasted.write_text(yaml.safe_dump({"tokens": [entry]}), encoding="utf-8")
    assert load_config(pasted, environ={}).tokens[0].token_hash == hash_token(token)


def test_tokens_new_as_json(config: Path) -> None:
    [row] = json.loads(run("tokens", "new", "--config", str(config), "--name", "x", "--format", "json").stdout)

    assert row["token_hash"] == f"sha256:{hash_token(row['token'])}"


def test_tokens_new_needs_no_config_or_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["tokens", "new", "--name", "x"])

    assert result.exit_code == 0
    assert result.stdout.startswith("sk-metrion-")


def empty_sqlite(tmp_path: Path) -> Path:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    return path


def not_sqlite(tmp_path: Path) -> Path:
    path = tmp_path / "notes.db"
    path.write_text("this is not a database\n" * 100, encoding="utf-8")
    return path


def empty_schema(tmp_path: Path) -> Path:
    path = tmp_path / "fresh.db"
    conn = store.connect(path)
    store.create_schema(conn)
    conn.close()
    return path


@pytest.mark.parametrize(
    ("make_database", "args", "message"),
    [
        (lambda tmp: tmp / "missing.db", ["report"], "no database at .*missing.db"),
        (lambda tmp: tmp / "missing.db", ["quota"], "no database at"),
        (empty_sqlite, ["report"], "no requests table"),
        (not_sqlite, ["logs"], "cannot read the database: file is not a database"),
        (empty_sqlite, ["quota"], "no monthly_usage table"),
        (empty_schema, ["report"], "no requests recorded yet"),
        (empty_schema, ["logs"], "no requests recorded yet"),
        (None, ["report", "--since", "yesterday"], "not a time: 'yesterday'"),
        (None, ["report", "--until", "soon"], "not a time: 'soon'"),
        (None, ["report", "--by", "colour"], "Invalid value for '--by': 'colour' is not one of 'token'"),
        (None, ["report", "--format", "xml"], "Invalid value for '--format'"),
        (None, ["logs", "--status", "bad"], "not a status: 'bad'"),
        (None, ["logs", "--limit", "0"], "Invalid value for '--limit'"),
        (None, ["logs", "--provider", "openia"], "unknown provider 'openia'"),
        (None, ["logs", "--since", "last week"], "not a time: 'last week'"),
        (None, ["quota", "nobody"], "no token named 'nobody'"),
        (None, ["tokens", "new", "--name", "x", "--plan", "gold"], "unknown plan 'gold'"),
        (None, ["tokens", "new", "--name", "team-1"], "already has a token named 'team-1'"),
        (None, ["report", "--bogus"], "No such option '--bogus'"),
    ],
)
def test_problems_are_one_line_on_stderr_with_exit_status_2(
    config: Path, tmp_path: Path, make_database, args: list[str], message: str
) -> None:
    if make_database is not None:
        (tmp_path / "other").mkdir()
        config = write_config(tmp_path / "other", make_database(tmp_path))

    result = CliRunner().invoke(main, [*args, "--config", str(config)])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert re.match(f"metrion: .*{message}", result.stderr)


def test_a_missing_database_is_not_created(config: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", tmp_path / "missing.db")

    run_result = CliRunner().invoke(main, ["logs", "--config", str(other)])

    assert run_result.exit_code == 2
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("database: [unclosed\n", "not valid YAML"),
        ("tokens:\n  - {name: a, token: nope}\n", "malformed token"),
    ],
)
def test_a_bad_config_is_one_line_with_exit_status_2(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(content, encoding="utf-8")

    result = CliRunner().invoke(main, ["report", "--config", str(path)])

    assert result.exit_code == 2
    assert re.fullmatch(f"metrion: .*{message}.*\n", result.stderr)


def test_no_config_file_to_find_is_one_line_with_exit_status_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["report"])

    assert result.exit_code == 2
    assert result.stderr.startswith("metrion: no config file: pass one explicitly, or create config.yaml")
