"""Loaded after Metrion by `bench/redis_cost.py`: how long Metrion's request hook held each request.

mitmproxy runs the addons' `request` hooks in order and awaits each (Metrion's coroutine, with Redis, included), so
this hook runs when Metrion's is done: hold = now − end of the client's request. Percentiles go to $BENCH_HOLD_PROBE.
"""

from __future__ import annotations

import json
import os
import time

from mitmproxy import http


class HoldProbe:
    def __init__(self) -> None:
        self.holds_us: list[float] = []

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.request.timestamp_end and not flow.response:
            self.holds_us.append((time.time() - flow.request.timestamp_end) * 1e6)

    def done(self) -> None:
        holds = sorted(self.holds_us) or [float("nan")]
        if path := os.environ.get("BENCH_HOLD_PROBE"):
            with open(path, "w") as f:
                json.dump({"n": len(self.holds_us), "p50_us": holds[len(holds) // 2],
                           "p99_us": holds[int(len(holds) * 0.99)]}, f)


addons = [HoldProbe()]
