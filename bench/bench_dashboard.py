"""Benchmark: every dashboard page and JSON endpoint over a seeded database of N rows (default 1,000,000).

Run `.venv/bin/python bench/bench_dashboard.py [--rows N] [--runs K] [--db PATH]`; it seeds PATH unless it
already holds N rows, then prints a Markdown table of median and worst times per page, period and filter.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml
from dashboard_data import TOKENS, people, seed
from starlette.testclient import TestClient

from metrion_addon.config import load_config
from metrion_addon.dashboard.app import PAGES, create_app

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
DAYS = 60
VIEWS = [
    {"period": "1h"},
    {"period": "24h"},
    {"period": "7d"},
    {"period": "30d"},
    {"period": "custom", "since": "2026-09-26", "until": "2026-11-25T11:47:13Z"},  # 60 days, ragged end
    {"period": "30d", "provider": "openai"},
    {"period": "30d", "token": "support-bot"},
    {"period": "30d", "requester": people()[0][0]},
    {"period": "30d", "status": "5xx"},
    {"period": "30d", "model": "gpt-4o", "status": "2xx"},
]


def rows_in(path: Path) -> int:
    try:
        with sqlite3.connect(path) as conn:
            return conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    except sqlite3.Error:
        return -1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--db", type=Path, default=Path(tempfile.gettempdir()) / "metrion-dashboard-bench.db")
    args = parser.parse_args()
    if rows_in(args.db) != args.rows:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{args.db}{suffix}").unlink(missing_ok=True)
        started = time.perf_counter()
        seed(args.db, args.rows, DAYS, NOW)
        print(f"seeded {args.rows:,} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    config_path = args.db.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump({
        "database": str(args.db),
        "tokens": [{"name": name, "token": f"sk-metrion-{i:032x}", "plan": "free"} for i, name in enumerate(TOKENS)],
    }))
    client = TestClient(create_app(load_config(config_path), clock=NOW.timestamp))
    with sqlite3.connect(args.db) as conn:
        sizes = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                 for table in ("requests", "hourly_usage", "daily_usage", "hourly_latency", "daily_latency")}
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("rows: " + ", ".join(f"{table} {n:,}" for table, n in sizes.items()))
    print(f"runs per cell: {args.runs}, the page and its JSON each; median / worst wall ms, then the worst CPU ms "
          "(this process's CPU time: what the machine's other load cannot inflate); HTML includes its template\n")
    print("| view | " + " | ".join(page.name for page in PAGES) + " | worst |")
    print("|---|" + "---|" * (len(PAGES) + 1))
    worst_all = 0.0
    for view in VIEWS:
        cells, worst_row = [], 0.0
        for page in PAGES:
            timings, cpu = [], []
            for url in (f"/api/{page.name}", page.path):
                for _ in range(args.runs):
                    started, started_cpu = time.perf_counter(), time.process_time()
                    response = client.get(url, params=view)
                    timings.append((time.perf_counter() - started) * 1000)
                    cpu.append((time.process_time() - started_cpu) * 1000)
                    assert response.status_code == 200, (url, view, response.text[:300])
            cells.append(f"{statistics.median(timings):.0f} / {max(timings):.0f} / {max(cpu):.0f}")
            worst_row = max(worst_row, max(timings))
        worst_all = max(worst_all, worst_row)
        label = "&".join(f"{k}={v}" for k, v in view.items())
        print(f"| `{label}` | " + " | ".join(cells) + f" | {worst_row:.0f} |")
    deep = {"period": "30d"}
    page = client.get("/api/logs", params=deep).json()["data"]
    for _ in range(100):  # walk 100 pages deep through the cursor
        deep = {"period": "30d", "older": page["older"]}
        page = client.get("/api/logs", params=deep).json()["data"]
    timings = []
    for _ in range(args.runs):
        started = time.perf_counter()
        client.get("/logs", params=deep)
        timings.append((time.perf_counter() - started) * 1000)
    median, worst = statistics.median(timings), max(timings)
    print(f"\nlogs, page 101 of the 30-day view: median {median:.0f} ms, worst {worst:.0f} ms")
    print(f"worst of everything: {max(worst_all, max(timings)):.0f} ms; load average at the end "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
