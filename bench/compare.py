"""A/B of Metrion checkouts under the scenario-2 load (8 connections), interleaved with bare mitmdump.

Run `.venv/bin/python bench/compare.py CHECKOUT [CHECKOUT ...] [--rounds N] [--seconds S]`: one Metrion per
checkout (a directory holding `metrion_addon/`, e.g. a `git worktree` of another commit; its package is the one
imported), all started side by side with one bare mitmdump and one upstream, then measured round by round in a
rotating order. A checkout may carry one environment variable for its proxy, `DIR:NAME=VALUE`. Prints medians over
rounds of req/s, p50, p99 and the proxy's CPU µs per request: the figures of a change are the difference between
checkouts of the same run, never between runs (see the caveat in RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from run import Proxy, Upstream, job_for, pct, run_load_sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkouts", nargs="+")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="metrion-compare-") as tmp:
        upstream = Upstream()
        proxies = {"bare mitmdump": Proxy("bare", upstream.port, Path(tmp) / "bare")}
        for i, checkout in enumerate(args.checkouts):
            root, _, setting = checkout.partition(":")
            name, _, value = setting.partition("=")
            proxies[checkout] = Proxy("metrion", upstream.port, Path(tmp) / f"metrion{i}",
                                      env={"PYTHONPATH": str(Path(root).resolve()), **({name: value} if name else {})})
        try:
            for proxy in proxies.values():  # one at a time: Proxy.start reads run.ROOT for the addon script's path
                if proxy.kind == "metrion":
                    run.ROOT = Path(proxy.env["PYTHONPATH"])
                proxy.start()
            results = measure(proxies, upstream.port, args.rounds, args.seconds)
        finally:
            for proxy in proxies.values():
                proxy.stop()
            upstream.stop()
    print(f"{'target':40} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11}   req/s per round")
    for name, rows in results.items():
        rps, p50, p99, cpu = (statistics.median(column) for column in zip(*rows, strict=True))
        print(f"{name:40} {rps:8.1f} {p50:8.2f} {p99:8.2f} {cpu:11.0f}   {[round(r[0]) for r in rows]}")


def measure(proxies: dict[str, Proxy], upstream_port: int, rounds: int, seconds: float) -> dict[str, list]:
    names = list(proxies)
    results: dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            kind = proxies[name].kind
            job = job_for(kind, upstream_port, {kind: proxies[name]}, kind="requests", conns=8, duration=seconds,
                          count=1_000_000, warmup=20)
            out, _ = run_load_sampled(job, proxies[name].pid)
            if out["errors"]:
                raise RuntimeError(f"{name}: {out['errors']} errors")
            latencies = [x / 1000 for x in out["latencies_us"]]
            rps = len(latencies) / out["elapsed"]
            results[name].append((rps, pct(latencies, 0.5), pct(latencies, 0.99), out["cpu_percent"] * 1e4 / rps))
    return results


if __name__ == "__main__":
    main()
