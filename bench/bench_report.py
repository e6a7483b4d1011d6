"""Benchmark: `metrion report --since 30d --by model` over a seeded database of N rows (default 1,000,000).

Run `.venv/bin/python bench/bench_report.py [--rows N] [--runs K]`; it prints the median and min timings.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from click.testing import CliRunner

from metrion_addon import report, store
from metrion_addon.cli import main

MODELS = [  # (provider, model, input $/M, output $/M)
    ("openai", "gpt-4o", 2.5, 10.0),
    ("openai", "gpt-4o-mini", 0.15, 0.6),
    ("openai", "o3-mini", 1.1, 4.4),
    ("anthropic", "claude-sonnet-4-5-20250929", 3.0, 15.0),
    ("anthropic", "claude-3-5-haiku-latest", 0.8, 4.0),
    ("gemini", "gemini-2.5-flash", 0.3, 2.5),
    ("gemini", "gemini-2.5-pro", 1.25, 10.0),
    ("mistral", "mistral-large-latest", 2.0, 6.0),
    ("grok", "grok-4", 3.0, 15.0),
    ("openai", "my-fine-tune", 0.0, 0.0),  # unpriced: cost_usd NULL
]
STATUSES = [200] * 950 + [429] * 20 + [500] * 10 + [400] * 10 + [None] * 10
DAYS = 60


def seed(path: Path, rows: int, now: datetime, rng: random.Random) -> None:
    """Write `rows` requests spread evenly over the DAYS before `now`, oldest first, in one transaction."""
    conn = store.connect(path)
    store.create_schema(conn)
    tokens = [f"token-{i:02d}" for i in range(20)]
    requesters = [f"user-{i}" for i in range(50)]
    start = now - timedelta(days=DAYS)
    step = timedelta(days=DAYS) / rows

    def row(i: int) -> tuple:
        provider, model, price_in, price_out = MODELS[int(rng.paretovariate(1.2)) % len(MODELS)]
        status = rng.choice(STATUSES)
        input_tokens = int(rng.lognormvariate(7, 1))
        cache_read = input_tokens // 2 if rng.random() < 0.3 else 0
        output_tokens = int(rng.lognormvariate(5, 1)) if status == 200 else 0
        cost = (input_tokens * price_in + output_tokens * price_out) / 1e6 if price_in else None
        ts = (start + step * i).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        record = store.RequestRecord(
            ts=ts,
            token_name=rng.choice(tokens),
            requester=rng.choice(requesters),
            provider=provider,
            model=model,
            path="/v1/chat/completions",
            method="POST",
            stream=rng.random() < 0.5,
            status=status,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read,
            total_tokens=input_tokens + output_tokens,
            latency_ms=rng.lognormvariate(6.5, 0.8),
            ttfb_ms=rng.lognormvariate(5.5, 0.6),
            usage_source="provider" if status == 200 else "none",
            error=None if status is not None else "upstream connection reset",
            auth_mode="stored",
            cost_usd=cost,
            price_source="bench" if cost is not None else None,
        )
        return tuple(getattr(record, name) for name in store.COLUMNS)

    insert = f"INSERT INTO requests ({', '.join(store.COLUMNS)}) VALUES ({', '.join('?' * len(store.COLUMNS))})"
    with conn:
        conn.execute("BEGIN")
        conn.executemany(insert, (row(i) for i in range(rows)))
    conn.close()


def time_cli(config: Path, runs: int) -> list[float]:
    """Seconds per in-process run of the CLI command, output formatting included."""
    runner = CliRunner()
    args = ["report", "--config", str(config), "--since", "30d", "--by", "model"]
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        result = runner.invoke(main, args)
        timings.append(time.perf_counter() - start)
        if result.exit_code != 0:
            raise SystemExit(f"metrion report failed: {result.output}")
    print(result.output)
    return timings


def time_process(config: Path) -> float:
    """Seconds for one `python -m metrion_addon.cli report ...` process, interpreter start-up included."""
    command = [sys.executable, "-m", "metrion_addon.cli", "report", "--config", str(config), "--since", "30d"]
    start = time.perf_counter()
    subprocess.run([*command, "--by", "model"], check=True, capture_output=True, cwd=Path(__file__).parent.parent)
    return time.perf_counter() - start


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        config = Path(tmp) / "config.yaml"
        config.write_text(f"database: {db}\n", encoding="utf-8")
        start = time.perf_counter()
        seed(db, args.rows, datetime.now(UTC), random.Random(4))
        print(f"seeded {args.rows:,} rows in {time.perf_counter() - start:.1f} s")
        with sqlite3.connect(db) as conn:
            in_range = conn.execute(
                "SELECT count(*) FROM requests WHERE ts >= ?", (report.parse_since("30d", datetime.now(UTC)),)
            ).fetchone()[0]
        print(f"rows in the last 30 days: {in_range:,}")
        timings = time_cli(config, args.runs)
        print(
            f"metrion report --since 30d --by model (in-process CLI, {args.runs} runs): "
            f"median {statistics.median(timings) * 1000:.0f} ms, min {min(timings) * 1000:.0f} ms"
        )
        print(f"same command as a new process (start-up included): {time_process(config) * 1000:.0f} ms")


if __name__ == "__main__":
    main_bench()
