"""What kill -9 loses: under steady load, SIGKILL the Metrion mitmdump and compare what reached the upstream with the
rows and the monthly counter left in SQLite. Repeated on a fresh database each round.

Run `.venv/bin/python bench/crash_loss.py [--rounds N] [--seconds S] [--no-write]`; writes its table into RESULTS.md
between markers (`make bench` runs it after bench/run.py).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import BENCH, PYTHON, TOKEN, Proxy, Upstream, job_for, machine, write_results_section

CONNS = 8


def upstream_count(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/bench/count")
        return int(conn.getresponse().read())
    finally:
        conn.close()


def warm_up(proxy: Proxy) -> None:
    """One request first: the first one through a fresh proxy pays for imports and price tables."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.request("POST", "/api/proxy/openai/v1/chat/completions", body=b'{"model": "gpt-4o", "messages": []}',
                     headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
        conn.getresponse().read()
    finally:
        conn.close()


def one_round(upstream: Upstream, workdir: Path, load_seconds: float) -> dict[str, float]:
    """Load for `load_seconds` on CONNS connections, SIGKILL the proxy, then count what was kept."""
    proxy = Proxy("metrion", upstream.port, workdir).start()
    warm_up(proxy)
    before = upstream_count(upstream.port)
    job = job_for("metrion", upstream.port, {"metrion": proxy}, kind="requests", conns=CONNS,
                  duration=load_seconds + 30, count=10_000_000, warmup=0)
    load = subprocess.Popen([PYTHON, str(BENCH / "load.py"), json.dumps(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    started = time.monotonic()
    time.sleep(load_seconds)
    assert proxy.process is not None
    proxy.process.kill()  # SIGKILL: no hook, no flush, no clean close of the database
    killed = time.monotonic()
    proxy.process.wait()
    proxy.process = None
    out, _ = load.communicate(timeout=30)  # each connection stops once the proxy refuses it
    answered = len(json.loads(out)["latencies_us"])  # 200s the clients received
    time.sleep(0.2)  # requests the upstream was still reading when the proxy died
    forwarded = upstream_count(upstream.port) - before
    with contextlib.closing(sqlite3.connect(workdir / "metrion.db")) as conn:
        rows = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        counted = conn.execute("SELECT coalesce(sum(requests), 0) FROM monthly_usage").fetchone()[0]
    rate = answered / (killed - started)
    rows -= 1  # the warm-up's
    counted -= 1
    lost = max(0, answered - rows)
    return {"forwarded": forwarded, "answered": answered, "rows": rows, "lost_rows": lost,
            "lost_ms": 1000 * lost / rate if rate else float("nan"), "in_flight": forwarded - answered,
            "unmetered": forwarded - rows, "counter_lag": forwarded - counted, "requests_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="load before each SIGKILL")
    parser.add_argument("--no-write", action="store_true", help="print JSON only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    rounds, seconds = args.rounds, args.seconds
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="metrion-crash-") as tmp:
        upstream = Upstream()
        try:
            for n in range(rounds):
                results.append(one_round(upstream, Path(tmp) / f"round{n}", seconds))
                print(f"round {n}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
        finally:
            upstream.stop()
    elapsed = time.monotonic() - started
    print(json.dumps(results, indent=1))
    if not args.no_write:
        command = ".venv/bin/python bench/crash_loss.py " + " ".join(sys.argv[1:])
        write_table(results, command.strip(), elapsed, seconds)


def write_table(results: list[dict[str, float]], command: str, elapsed: float, seconds: float) -> None:
    info = machine()
    columns = ("forwarded", "answered", "rows", "lost_rows", "lost_ms", "in_flight", "unmetered", "counter_lag",
               "requests_per_s")
    lines = [f"Command: `{command}` ({elapsed:.0f} s; {len(results)} rounds of {seconds:g} s of load on {CONNS} "
             "connections, then SIGKILL)", "",
             f"Machine: {info['cores']} cores ({info['cpu']}), Python {info['python']}, mitmproxy {info['mitmproxy']}, "
             f"load average {os.getloadavg()[0]:.1f} at the end (other processes share the cores)",
             "", "| round | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for n, result in enumerate(results):
        lines.append(f"| {n} | " + " | ".join(_fmt(result[c]) for c in columns) + " |")
    for name, pick in (("median", statistics.median), ("max", max)):
        lines.append(f"| **{name}** | " + " | ".join(_fmt(pick(r[c] for r in results)) for c in columns) + " |")
    write_results_section("crash", "\n".join(lines))


def _fmt(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.1f}"


if __name__ == "__main__":
    main()
