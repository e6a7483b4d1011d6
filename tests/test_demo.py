"""`make demo`: its config, its clock and directory handling, and a short run end to end (mock, Metrion, dashboard)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from harness import free_port

from metrion_addon import demo, workload
from metrion_addon.clock import FileClock
from metrion_addon.config import PROVIDERS, TOKEN_RE, load_config


def test_the_demo_config_is_valid_with_a_token_per_team(tmp_path: Path) -> None:
    config = demo.demo_config(tmp_path / "m.db", lambda p: f"http://127.0.0.1:9/{p}", workload.TEAMS, 60, 42)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    loaded = load_config(path, environ={})

    assert [token.name for token in loaded.tokens] == [team.token for team in workload.TEAMS]
    assert loaded.plans["free"].monthly_requests == 42 and loaded.plans["pro"].monthly_requests is None
    assert loaded.rate_limit == 60
    stored = {token.name for token in loaded.tokens if token.keys}
    assert stored == {team.token for team in workload.TEAMS if team.stored}
    assert all(TOKEN_RE.fullmatch(demo.token_value(team.token)) for team in workload.TEAMS)
    assert demo.token_value("web-app") == demo.token_value("web-app") != demo.token_value("research")


def test_every_move_of_the_clock_reaches_the_proxys_clock_even_within_one_mtime_tick(tmp_path: Path) -> None:
    moving = demo.MovingClock(tmp_path / "clock")
    moving.set(1_790_000_000.0)
    proxy_clock = FileClock(moving.path)

    seen = []
    for step in range(200):  # far faster than a filesystem's timestamp granularity
        moving.set(1_790_000_000.0 + step * 61.5)
        seen.append(proxy_clock())

    assert seen == [1_790_000_000.0 + step * 61.5 for step in range(200)]


def test_the_demo_wipes_only_a_directory_it_made(tmp_path: Path) -> None:
    mine = tmp_path / "demo"
    demo.prepare(mine)
    (mine / "metrion.db").write_text("old run")
    demo.prepare(mine)
    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")

    assert not (mine / "metrion.db").exists()
    with pytest.raises(demo.DemoError, match="not a demo directory"):
        demo.prepare(theirs)
    assert (theirs / "notes.txt").read_text() == "keep me"


def test_a_quick_demo_fills_the_database_through_the_proxy_and_serves_the_dashboard(tmp_path: Path) -> None:
    workdir, port = tmp_path / "demo", free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "metrion_addon.demo", "--quick", "--dir", str(workdir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        output = []
        deadline = time.monotonic() + 180  # a loaded 2-core machine; about 15 s when it is idle
        while not any(line.startswith("  Dashboard  ") for line in output):
            assert process.poll() is None and time.monotonic() < deadline, "".join(output)
            output.append(process.stdout.readline())
        url = next(line.split()[1] for line in output if line.startswith("  Dashboard  "))
        page = httpx.get(url, timeout=30)
        with sqlite3.connect(workdir / "metrion.db") as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(row) for row in conn.execute("SELECT * FROM requests")]
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)

    assert url == f"http://127.0.0.1:{port}/"
    assert page.status_code == 200
    assert code == 0
    assert {row["provider"] for row in rows} == set(PROVIDERS)
    gemini = {row["path"].rsplit("/", 1)[1] for row in rows if row["provider"] == "gemini" and row["status"] == 200}
    assert {"gemini-2.5-flash:streamGenerateContent?alt=sse", "gemini-2.5-pro:generateContent",  # google-genai
            "completions"} <= gemini  # and the openai SDK on Gemini's OpenAI-compatible API
    assert any(row["reasoning_tokens"] for row in rows if row["model"] == "gemini-2.5-pro")
    assert {row["stream"] for row in rows} == {0, 1}
    assert len({row["requester"] for row in rows}) >= 6
    assert {row["token_name"] for row in rows} == {team.token for team in workload.TEAMS} | {None}  # None: bad token
    assert any(row["cache_read_tokens"] >= 1024 for row in rows if row["provider"] == "openai")
    assert any(row["cache_read_tokens"] for row in rows if row["provider"] == "anthropic")
    assert {row["provider"] for row in rows if row["reasoning_tokens"]} >= {"openai", "grok"}
    assert any(row["status"] == 429 and "rate limit" in (row["error"] or "").lower() for row in rows)  # Metrion's
    assert {row["status"] for row in rows if (row["error"] or "").startswith("provider:")} >= {429, 500}
    assert any(row["token_name"] is None and row["status"] == 401 for row in rows)
    assert any(row["usage_source"] == "estimated" and row["error"] for row in rows)  # the stream cut short
    assert all(row["cost_usd"] is None for row in rows if row["model"] == workload.UNPRICED)
    assert any(row["model"] == workload.UNPRICED and row["status"] == 200 for row in rows)
    # a day of history: its quiet hours (evenings UTC) may hold no call, so look at how far back it reaches
    earliest = min(datetime.fromisoformat(row["ts"].replace("Z", "+00:00")) for row in rows)
    assert datetime.now(UTC) - earliest > timedelta(hours=12)
    assert all(row["cost_usd"] > 0 for row in rows if row["model"] == "gpt-4o-2024-08-06" and row["status"] == 200)
    with pytest.raises(httpx.TransportError):  # Ctrl-C stopped the dashboard too
        httpx.get(url, timeout=2)
