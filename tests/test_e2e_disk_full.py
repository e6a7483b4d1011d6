"""Issue 9, defect 3: a full disk with a large backlog, through a real mitmdump, and the recovery once space is freed.

The database lives on a small tmpfs (or, where mounting is refused, behind a file-size limit set on the running
mitmdump). 1,500 requests are forwarded and held by the mock; the disk fills; the writer notices, Metrion answers
503 and forwards nothing; the held requests are answered, so their 1,500 rows wait in the backlog; space is freed;
the backlog is written in transactions of 500, every forwarded request's row lands and health is 200 again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import raw_http
from harness import APP_TOKEN, Proxy, base_config

from metrion_addon.mock_provider import MockProvider
from metrion_addon.store.writer import BACKLOG_ROWS, CHUNK_ROWS

HELD = 1500
REFUSED = 30
CHAT = b"/api/proxy/openai/v1/chat/completions"


class Tmpfs:
    """A small tmpfs mounted for the test: fill() writes a file until the disk is full, free() deletes it."""

    def __init__(self, mountpoint: Path, megabytes: int) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mountpoint)],
                       check=True, capture_output=True, text=True)
        self.filler = mountpoint / "filler"

    def fill(self, proxy: Proxy) -> None:
        with self.filler.open("wb", buffering=0) as f:  # unbuffered: closing it has nothing left to flush
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e

    def free(self, proxy: Proxy) -> None:
        self.filler.unlink()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=True, capture_output=True)  # never left behind


class FileSizeLimit:
    """Where mounting is refused: RLIMIT_FSIZE on the running mitmdump, whose writes past 4 KB then fail (EFBIG)."""

    def __init__(self, directory: Path) -> None:
        self.mountpoint = directory
        directory.mkdir(parents=True, exist_ok=True)

    def fill(self, proxy: Proxy) -> None:
        """Writes past the first page of any file fail: a truncated WAL cannot grow back as it could on a disk."""
        assert proxy.process is not None
        try:
            resource.prlimit(proxy.process.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        except OSError as e:  # neither a tmpfs nor a limit: say so, never skip
            pytest.fail(f"cannot make a small disk: mount -t tmpfs was refused and prlimit(RLIMIT_FSIZE) too ({e})")

    def free(self, proxy: Proxy) -> None:
        assert proxy.process is not None
        resource.prlimit(proxy.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    def close(self) -> None:
        pass


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Tmpfs | FileSizeLimit]:
    """A tmpfs if this process may mount one (METRION_TEST_DISK=fsize forces the fallback), else a file-size limit."""
    directory = tmp_path / "disk"
    disk: Tmpfs | FileSizeLimit = FileSizeLimit(directory)
    if os.environ.get("METRION_TEST_DISK") != "fsize":
        try:
            disk = Tmpfs(directory, megabytes=16)
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"mount -t tmpfs refused ({getattr(e, 'stderr', '') or e}); using RLIMIT_FSIZE instead")
    yield disk
    disk.close()


def held_request(key: str) -> bytes:
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "held through a full disk"}]}'
    return raw_http.request(b"POST", CHAT, [
        (b"host", b"metrion.local"), (b"authorization", b"Bearer " + APP_TOKEN.encode()),
        (b"content-type", b"application/json"), (b"x-mock-scenario", b"gate:" + key.encode()),
        (b"x-metrion-user", b"held")], body)


def call(proxy: Proxy, who: str) -> httpx.Response:
    return httpx.post(f"{proxy.url}/api/proxy/openai/v1/chat/completions", timeout=30, headers={
        "authorization": f"Bearer {APP_TOKEN}", "x-metrion-user": who},
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": who}]})


def health(proxy: Proxy) -> httpx.Response:
    return httpx.get(f"{proxy.url}/metrion/health", timeout=10)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_full_disk_with_a_large_backlog_recovers_once_space_is_freed(
        small_disk: Tmpfs | FileSizeLimit, mock: MockProvider, tmp_path: Path) -> None:
    assert CHUNK_ROWS == 500 and BACKLOG_ROWS == 100_000  # the README's figures
    workdir = tmp_path / "proxy"
    config = base_config(mock.base_url, small_disk.mountpoint / "metrion.db", timeout=300, rate_limit=100000)
    proxy = Proxy(workdir, config, pipe_log=isinstance(small_disk, FileSizeLimit)).start()
    try:
        key = os.urandom(8).hex()
        before = len(mock.received)
        held = [raw_http.open_request(proxy.port, held_request(key), timeout=120) for _ in range(HELD)]
        wait_for(lambda: len(mock.received) - before >= HELD, 90, f"{HELD} requests to reach the mock")

        small_disk.fill(proxy)
        forwarded_probes = 0
        for n in range(200):  # until the writer has hit the full disk (free pages in the WAL may take a few rows)
            response = call(proxy, f"probe {n}")
            if response.status_code == 503:
                break
            assert response.status_code == 200
            forwarded_probes += 1
        assert response.status_code == 503 and response.json()["error"]["code"] == "metering_unavailable"
        refused = [call(proxy, "refused").status_code for _ in range(REFUSED)]
        assert refused == [503] * REFUSED
        assert health(proxy).status_code == 503

        mock.open_gate(key)
        answers = [raw_http.read_answer(conn, timeout=120) for conn in held]
        assert [a.status for a in answers] == [200] * HELD  # the provider's answers reach the clients
        wait_for(lambda: health(proxy).json()["backlog"] >= HELD + forwarded_probes, 30, "the backlog")
        time.sleep(1.5)  # at least one retry against the full disk
        assert health(proxy).status_code == 503

        small_disk.free(proxy)
        wait_for(lambda: health(proxy).status_code == 200, 30, "health to be 200 again")
        rows = proxy.rows(n=HELD + forwarded_probes, timeout=30)
        assert len(rows) == HELD + forwarded_probes  # every forwarded request's row, none of the refused ones
        assert sum(row["requester"] == "held" and row["status"] == 200 for row in rows) == HELD
        assert call(proxy, "after").status_code == 200
        log = proxy.log_path.read_text()
        (recovered,) = re.findall(r"database writes work again \((\d+) rows waiting, (\d+) written in this first "
                                  r"transaction\); (\d+) requests were answered 503", log)
        waiting, first, answered_503 = map(int, recovered)
        assert waiting >= HELD and first <= CHUNK_ROWS  # small transactions, not the whole backlog at once
        assert answered_503 == REFUSED + 1
    finally:
        code = proxy.stop()
    assert code == 0 and "could not be written" not in proxy.log_path.read_text()
    with contextlib.closing(sqlite3.connect(proxy.db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == HELD + forwarded_probes + 1
        assert conn.execute("SELECT requests FROM monthly_usage").fetchone()[0] == HELD + forwarded_probes + 1
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
