"""Alert rule periods and durations: `month`, `day`, rolling windows like `15m`, or `{since: DATE}`; `24h` cooldowns.

Pure parsing (ValueError with the reason) and the bounds of a period at a given time; config.py validates with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

TYPES = {  # alert rule type -> the units its threshold may be in
    "budget": ("usd",),
    "error_rate": ("percent", "count"),
    "latency_p95": ("ms",),
    "request_volume": ("requests", "count"),
}
_DURATION = re.compile(r"(\d+)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in `90s`, `15m`, `1h` or `7d`; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"expected a duration like 15m, 1h or 7d, not {text!r}")
    return int(match.group(1)) * _SECONDS[match.group(2)]


@dataclass(frozen=True)
class Period:
    """`month` or `day` (calendar, UTC), a rolling window (`window` seconds back from now), or `since` a date."""

    kind: str  # "month" | "day" | "rolling" | "since"
    window: float = 0.0
    since: float = 0.0

    def bounds(self, now: float) -> tuple[float, float]:
        """(start, end): the calendar period `now` falls in, or [now - window, now), or [since, now)."""
        moment = datetime.fromtimestamp(now, UTC)
        if self.kind == "month":
            start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
            end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
            return start.timestamp(), end.timestamp()
        if self.kind == "day":
            start = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
            return start.timestamp(), (start + timedelta(days=1)).timestamp()
        if self.kind == "rolling":
            return now - self.window, now
        return self.since, now

    def key(self, now: float) -> float | None:
        """What identifies the current period: levels re-arm when it changes (rolling windows never change)."""
        return self.bounds(now)[0] if self.kind in ("month", "day") else self.since if self.kind == "since" else None

    def describe(self) -> str:
        if self.kind == "rolling":
            return f"the last {_duration_text(self.window)}"
        if self.kind == "since":
            return f"since {datetime.fromtimestamp(self.since, UTC).date().isoformat()}"
        return f"this {self.kind} (UTC)"


def _duration_text(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds % _SECONDS[unit] == 0:
            return f"{int(seconds // _SECONDS[unit])}{unit}"
    return f"{int(seconds)}s"


def parse_period(value: object) -> Period:
    """`month`, `day`, a rolling window like `15m`/`1h`/`7d`, or `{since: 2026-11-01}`; ValueError otherwise."""
    if value in ("month", "day"):
        return Period(str(value))
    if isinstance(value, str):
        try:
            return Period("rolling", window=parse_duration(value))
        except ValueError:
            raise ValueError(f"expected month, day, a window like 15m or 1h, or {{since: DATE}}, not {value!r}") \
                from None
    if isinstance(value, dict) and set(value) == {"since"}:
        since = value["since"]
        if isinstance(since, datetime):
            return Period("since", since=since.replace(tzinfo=since.tzinfo or UTC).timestamp())
        if isinstance(since, date):
            return Period("since", since=datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp())
        try:
            moment = datetime.fromisoformat(str(since).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"since: expected a date like 2026-11-01, not {since!r}") from None
        return Period("since", since=moment.replace(tzinfo=moment.tzinfo or UTC).timestamp())
    raise ValueError(f"expected month, day, a window like 15m or 1h, or {{since: DATE}}, not {value!r}")
