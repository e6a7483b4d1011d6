"""The response cache's benchmark: how fast a hit answers, against bare mitmdump forwarding to the loopback upstream.

Run `.venv/bin/python bench/cache_hit.py [--quick] [--no-write]`; writes its tables into RESULTS.md between markers.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from run import Proxy, Upstream, cpu_seconds, fmt, job_for, machine, med, pct, run_load, write_results_section

TARGETS = ("direct", "bare", "metrion", "metrion hit")
CACHE = {"x-metrion-cache": "true"}
STREAM = {"x-bench-events": "20", "x-bench-interval-ms": "0"}


def measure(target: str, upstream: int, proxies: dict[str, Proxy], stream: bool, seconds: float) -> dict[str, float]:
    headers = {**(STREAM if stream else {}), **(CACHE if target == "metrion hit" else {})}
    kind = target.split()[0]
    job = job_for(kind, upstream, proxies, kind="requests", conns=1, duration=seconds, count=100_000,
                  warmup=20, stream=stream, headers=headers)
    pid = proxies[kind].pid if kind in proxies else None
    cpu = cpu_seconds(pid) if pid else 0.0
    result = run_load(job)  # the proxy's CPU covers the warm-up too: 20 more requests than timed
    cpu = cpu_seconds(pid) - cpu if pid else float("nan")
    latencies = [us / 1000 for us in result["latencies_us"]]
    return {"p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99), "requests": len(latencies),
            "proxy_cpu_ms_per_request": 1000 * cpu / (len(latencies) + 20), "errors": result["errors"]}


def prime(upstream: int, proxies: dict[str, Proxy]) -> None:
    """Store the entries the hit rounds will read (the writer stores an entry within its ~50 ms batch)."""
    for stream in (False, True):
        run_load(job_for("metrion", upstream, proxies, kind="requests", conns=1, duration=5, count=1, warmup=0,
                         stream=stream, headers={**(STREAM if stream else {}), **CACHE}))
    time.sleep(0.5)


def hit_share(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FILTER (WHERE cache_status = 'HIT'), count(*) FROM requests "
                            "WHERE cache_status IS NOT NULL").fetchone()


def table(title: str, data: dict[str, dict[str, float]]) -> str:
    metrics = list(next(iter(data.values())))
    lines = [f"#### {title}", "", "| target | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {target} | " + " | ".join(fmt(values[m]) for m in metrics) + " |" for target, values in data.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 s per measurement instead of 4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave RESULTS.md alone")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    started = time.monotonic()
    upstream = Upstream()
    with tempfile.TemporaryDirectory() as tmp:
        proxies = {kind: Proxy(kind, upstream.port, Path(tmp) / kind).start() for kind in ("bare", "metrion")}
        try:
            prime(upstream.port, proxies)
            tables = {}
            for stream in (False, True):
                collected: dict[str, dict[str, list[float]]] = {t: {} for t in TARGETS}
                for r in range(args.rounds):
                    for target in TARGETS[r % 4:] + TARGETS[: r % 4]:
                        for metric, value in measure(target, upstream.port, proxies, stream, seconds).items():
                            collected[target].setdefault(metric, []).append(value)
                kind = "streamed, 20 events, whole stream" if stream else "non-streaming"
                tables[kind] = {t: {m: med(v) for m, v in metrics.items()} for t, metrics in collected.items()}
            hits, lookups = hit_share(Path(tmp) / "metrion" / "metrion.db")
        finally:
            for proxy in proxies.values():
                proxy.stop()
            upstream.stop()
    info = machine()
    body = [f"Command: `.venv/bin/python bench/cache_hit.py{' --quick' if args.quick else ''}` "
            f"({time.monotonic() - started:.0f} s; {args.rounds} interleaved rounds of {seconds:g} s per target, "
            "1 connection, medians of per-round values)", "",
            f"Machine: {info['cores']} cores ({info['cpu']}), Python {info['python']}, "
            f"mitmproxy {info['mitmproxy']}", "",
            f"Rows that asked for the cache: {lookups}, of which hits: {hits} (the rest are the priming misses).", ""]
    body += [table(f"Response cache — {kind}, latency per request", data) + "\n" for kind, data in tables.items()]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_results_section("cache", text)


if __name__ == "__main__":
    main()
