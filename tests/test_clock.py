"""Timestamps are fixed-width UTC text whose order is time order; the test clock follows its file."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from metrion_addon.clock import FileClock, iso_utc


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_iso_utc_matches_datetime_to_the_millisecond(moment: datetime) -> None:
    seconds = moment.replace(tzinfo=UTC).timestamp()
    expected = datetime.fromtimestamp(seconds, UTC)
    assert iso_utc(seconds) == expected.strftime("%Y-%m-%dT%H:%M:%S.") + f"{expected.microsecond // 1000:03d}Z"


def test_file_clock_follows_its_file(tmp_path: Path) -> None:
    path = tmp_path / "now"
    path.write_text("2026-11-30T23:59:59Z")
    clock = FileClock(path)
    assert iso_utc(clock()) == "2026-11-30T23:59:59.000Z"
    path.write_text("2026-12-01T00:00:00Z")
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))
    assert iso_utc(clock()) == "2026-12-01T00:00:00.000Z"
