"""What limits on Redis add to one request at 1 connection, and where: end to end, inside the proxy, and on the wire.

Run `.venv/bin/python bench/redis_cost.py [--seconds S] [--rounds N]`: Metrion with and without `shared.redis`,
interleaved, each with `bench/hold_probe.py` (time from the end of the client's request to the upstream connection),
then the Redis round trip of the admission script alone, from redis-py's asyncio client in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis.asyncio
from peers import RedisServer
from run import BENCH, Proxy, Upstream, job_for, pct, run_load

from metrion_addon.shared_limits import ADMIT


async def round_trips(url: str, n: int) -> dict[str, float]:
    client = redis.asyncio.Redis.from_url(url)
    script = client.register_script(ADMIT)
    times: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await script(keys=["metrion:rate:probe", "metrion:month:probe:2026-12"],
                     args=[repr(time.time()), 1_000_000, -1, 2_000_000_000, 120, 1])
        times.append((time.perf_counter() - t0) * 1000)
    await client.aclose()
    return {"p50_ms": pct(times, 0.5), "p99_ms": pct(times, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="metrion-redis-cost-") as tmp:
        workdir = Path(tmp)
        upstream = Upstream()
        server = RedisServer(workdir / "redis").start()
        probes = {k: workdir / f"{k}.json" for k in ("sqlite", "redis")}
        proxies = {k: Proxy("metrion", upstream.port, workdir / k, scripts=(BENCH / "hold_probe.py",),
                            env={"BENCH_HOLD_PROBE": str(probes[k])}, redis_url=server.url if k == "redis" else None)
                   for k in probes}
        end_to_end: dict[str, list[float]] = {k: [] for k in proxies}
        try:
            for proxy in proxies.values():
                proxy.start()
            for r in range(args.rounds):
                for k in (list(proxies) if r % 2 == 0 else list(proxies)[::-1]):
                    out = run_load(job_for("metrion", upstream.port, {"metrion": proxies[k]}, kind="requests",
                                           conns=1, duration=args.seconds, count=1_000_000, warmup=50))
                    end_to_end[k].append(pct([x / 1000 for x in out["latencies_us"]], 0.5))
        finally:
            for proxy in proxies.values():
                proxy.stop()
            upstream.stop()
        rtt = asyncio.run(round_trips(server.url, 3000))
        server.stop()
        holds = {k: json.loads(path.read_text()) for k, path in probes.items()}
    result = {
        "end_to_end_p50_ms": {k: statistics.median(v) for k, v in end_to_end.items()},
        "hold_in_proxy_p50_ms": {k: holds[k]["p50_us"] / 1000 for k in holds},
        "hold_in_proxy_p99_ms": {k: holds[k]["p99_us"] / 1000 for k in holds},
        "admission_script_round_trip_ms": rtt,
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
