"""The wall clock limits and timestamps use, and a settable one for tests that cross a month boundary.

METRION_CLOCK_FILE=path makes the time whatever ISO 8601 instant that file holds (re-read when it changes).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

Clock = Callable[[], float]


class FileClock:
    """A frozen clock whose time is read from a file, so a test can move it while the proxy runs."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: float | None = None
        self._now = 0.0

    def __call__(self) -> float:
        stamp = self._path.stat().st_mtime_ns
        if stamp != self._stamp:
            text = self._path.read_text().strip().replace("Z", "+00:00")
            self._now = datetime.fromisoformat(text).timestamp()
            self._stamp = stamp
        return self._now


def clock_from_env(environ: Mapping[str, str] = os.environ) -> Clock:
    path = environ.get("METRION_CLOCK_FILE")
    return FileClock(Path(path)) if path else time.time


def iso_utc(seconds: float) -> str:
    """`2026-11-24T20:32:29.123Z`: fixed width, so text order is time order."""
    whole, micros = divmod(round(seconds * 1_000_000), 1_000_000)  # to the microsecond, as datetime rounds
    return f"{_iso_second(whole)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _iso_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
