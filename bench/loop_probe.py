"""Measures how long mitmproxy's event loop is held: a 1 ms ticker records how late each tick runs.

Loaded next to Metrion (or alone) by `bench/run.py --scenarios 6`; writes percentiles to $BENCH_LOOP_PROBE on exit.
With $BENCH_SLOW_CALLBACK_MS set it also turns on asyncio debug mode, which logs each callback slower than that.
"""

from __future__ import annotations

import asyncio
import json
import os
import time


class LoopProbe:
    def __init__(self) -> None:
        self.lags_us: list[float] = []
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        if slow_ms := os.environ.get("BENCH_SLOW_CALLBACK_MS"):
            loop.set_debug(True)
            loop.slow_callback_duration = float(slow_ms) / 1000
        self._task = loop.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags_us.append((time.perf_counter() - t0 - 0.001) * 1e6)

    def done(self) -> None:
        if self._task:
            self._task.cancel()
        lags = sorted(self.lags_us) or [0.0]
        result = {"ticks": len(lags), "p50_us": lags[len(lags) // 2], "p99_us": lags[int(len(lags) * 0.99)],
                  "p999_us": lags[int(len(lags) * 0.999)], "max_us": lags[-1],
                  "over_5ms": sum(x > 5000 for x in lags), "over_20ms": sum(x > 20000 for x in lags)}
        if path := os.environ.get("BENCH_LOOP_PROBE"):
            with open(path, "w") as f:
                json.dump(result, f)


addons = [LoopProbe()]
