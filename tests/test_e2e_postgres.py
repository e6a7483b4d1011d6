"""The request log on a real PostgreSQL, written by real mitmdump processes sharing limits on a real Redis.

Every forwarded request's row lands exactly once, also when PostgreSQL stops mid-load: rows wait in each instance's
spool (shown in /metrion/health and /metrion/metrics) and are replayed when it is back.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg
from harness import APP_TOKEN
from test_e2e_metering import request_for

from metrion_addon.mock_provider import MockProvider


def pg_count(url: str, marker: str) -> tuple[int, int, int]:
    """(rows, distinct uids, requests counted in hourly_usage) of this test's rows."""
    with psycopg.connect(url) as conn:
        rows, uids = conn.execute("SELECT count(*), count(DISTINCT uid) FROM requests WHERE requester = %s",
                                  (marker,)).fetchone()
        (hourly,) = conn.execute("SELECT coalesce(sum(requests), 0) FROM hourly_usage WHERE requester = %s",
                                 (marker,)).fetchone()
    return rows, uids, int(hourly)


class Load:
    """Threads sending chat completions round-robin over the proxies until stopped; statuses kept."""

    def __init__(self, urls: list[str], marker: str, threads: int = 4) -> None:
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._urls = itertools.cycle(urls)
        self._lock = threading.Lock()
        self._marker = marker
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        path, body, _ = request_for("openai", stream=False)
        body = {**body, "messages": [{"role": "user", "content": self._marker}]}
        headers = {"authorization": f"Bearer {APP_TOKEN}", "x-metrion-user": self._marker}
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                with self._lock:
                    url = next(self._urls)
                try:
                    status = client.post(f"{url}{path}", json=body, headers=headers).status_code
                except httpx.TransportError:
                    status = 0
                with self._lock:
                    self.statuses.append(status)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def spool_gauges(metrics: str) -> tuple[float, float]:
    values = dict(line.split() for line in metrics.splitlines() if line.startswith("metrion_spool_"))
    return float(values["metrion_spool_rows"]), float(values["metrion_spool_bytes"])


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_every_forwarded_row_lands_once_across_a_postgres_restart_mid_load(
    start_proxy, start_redis, postgres, mock: MockProvider, tmp_path: Path
) -> None:
    url = postgres.create_database(f"log_{uuid.uuid4().hex[:8]}")
    redis = start_redis()
    proxies = [start_proxy(database=url, shared={"redis": redis.url}) for _ in range(2)]
    urls = [proxy.url for proxy in proxies]
    marker = f"pg-{uuid.uuid4()}"
    with Load(urls, marker) as load:
        wait_for(lambda: len(load.statuses) >= 30)
        postgres.kill()  # a crash: no checkpoint, every connection cut
        sent = len(load.statuses)
        wait_for(lambda: len(load.statuses) >= sent + 40)  # traffic goes on while the log is down
        wait_for(lambda: all(httpx.get(f"{u}/metrion/health").json()["spool"]["rows"] > 0 for u in urls))
        healths = [httpx.get(f"{u}/metrion/health").json() for u in urls]
        spooled = [spool_gauges(httpx.get(f"{u}/metrion/metrics").text) for u in urls]
        postgres.start()
        sent = len(load.statuses)
        wait_for(lambda: len(load.statuses) >= sent + 30)

    assert set(load.statuses) == {200}, "no request is refused while the spool takes the rows"
    for health, (rows, size) in zip(healths, spooled, strict=True):
        assert health["status"] == "ok" and "unreachable" in health["database"]
        assert rows >= health["spool"]["rows"] > 0 and size >= health["spool"]["bytes"] > 0  # (later, more)
    wait_for(lambda: pg_count(url, marker)[0] >= len(load.statuses))
    time.sleep(0.5)  # nothing more arrives: no row twice
    rows, uids, hourly = pg_count(url, marker)
    assert rows == uids == hourly == len(load.statuses) == sum(marker.encode() in r.body for r in mock.received)
    for u in urls:
        wait_for(lambda u=u: httpx.get(f"{u}/metrion/health").json()["spool"]["rows"] == 0)
        assert httpx.get(f"{u}/metrion/health").json()["database"] == "postgresql"
