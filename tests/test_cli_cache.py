"""`metrion cache stats` and `metrion cache clear` against a database with known rows and entries."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from metrion_addon import store
from metrion_addon.cache import CacheEntry
from metrion_addon.cli import main
from metrion_addon.store import CacheWrite, RequestRecord

ROW = RequestRecord(ts="2026-11-20T10:00:00.000Z", token_name="app", requester=None, provider="openai",
                    model="gpt-4o-2024-08-06", path="/v1/chat/completions", method="POST", stream=False, status=200)


def seeded(tmp_path: Path) -> Path:
    database = tmp_path / "m.db"
    conn = store.connect(database)
    store.create_schema(conn)
    rows = [
        replace(ROW, cache_status="MISS", cost_usd=0.02),
        replace(ROW, cache_status="HIT", cached=True, cost_usd=0.0, saved_usd=0.02),
        replace(ROW, cache_status="HIT", cached=True, cost_usd=0.0, saved_usd=0.02, ts="2026-11-24T10:00:00.000Z"),
        replace(ROW, cache_status="REFRESH", cost_usd=0.02),
        replace(ROW, cost_usd=0.5),  # did not ask for the cache
    ]
    writer = store.Writer(store.SQLiteBackend(conn))
    writer.start()
    for row in rows:
        writer.put(row)
    now = time.time()
    for key, token, model in [("a", "app", "gpt-4o-2024-08-06"), ("b", "app", "claude-sonnet-4"),
                              ("c", "ci", "gpt-4o-2024-08-06")]:
        entry = CacheEntry(key, token, "openai", model, 200, (), b"x" * 1000, False, now, now + 60)
        writer.put(CacheWrite(entry, ROW, 1 << 20))
    writer.close()
    with sqlite3.connect(database) as conn:  # expired since the last write: purged by the next one
        conn.execute("INSERT INTO cache_entries VALUES ('d', 'ci', 'openai', 'gpt-4o', 200, '[]', x'00', 0, 1, 2, 1, "
                     "1000, NULL)")
    (tmp_path / "config.yaml").write_text(f"database: {database}\n")
    return tmp_path / "config.yaml"


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_stats_show_entries_bytes_hit_rate_and_savings(tmp_path: Path) -> None:
    config = str(seeded(tmp_path))
    (stats,) = json.loads(run("cache", "stats", "--config", config, "--format", "json"))
    assert stats == {"entries": 3, "expired": 1, "bytes": 4 * 1000, "lookups": 3, "hits": 2, "refreshes": 1,
                     "hit_rate": 0.666666666667, "saved_usd": 0.04}
    (recent,) = json.loads(run("cache", "stats", "--config", config, "--format", "json", "--since", "2026-11-22"))
    assert (recent["lookups"], recent["hits"], recent["hit_rate"], recent["saved_usd"]) == (1, 1, 1.0, 0.02)
    table = run("cache", "stats", "--config", config)
    assert "hit rate" in table and "66.7%" in table and "$0.04" in table and "4.0 kB" in table


@pytest.mark.parametrize("args,left", [
    ([], set()),
    (["--token", "ci"], {"a", "b"}),
    (["--model", "gpt-4o"], {"b"}),
    (["--model", "gpt-4o-2024-08-06", "--token", "app"], {"b", "c", "d"}),
    (["--model", "unknown"], {"a", "b", "c", "d"}),
])
def test_clear_removes_the_entries_of_a_token_and_or_a_model(tmp_path: Path, args: list[str], left: set[str]) -> None:
    config = str(seeded(tmp_path))
    with sqlite3.connect(tmp_path / "m.db") as conn:
        before = {key for (key,) in conn.execute("SELECT key FROM cache_entries")}
    output = run("cache", "clear", "--config", config, *args)
    with sqlite3.connect(tmp_path / "m.db") as conn:
        after = {key for (key,) in conn.execute("SELECT key FROM cache_entries")}
    assert after == left
    removed = len(before - after)
    assert output == f"removed {removed} cache entr{'y' if removed == 1 else 'ies'}\n"


def test_a_missing_database_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(f"database: {tmp_path / 'none.db'}\n")
    result = CliRunner().invoke(main, ["cache", "stats", "--config", str(tmp_path / "config.yaml")])
    assert result.exit_code == 2 and result.output.startswith("metrion: no database at ")
