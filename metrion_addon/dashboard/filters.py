"""The filter bar's state, read from the URL: a period preset or custom range, and what to narrow rows to.

Pure: the clock's time is passed in; a bad value raises ValueError with a message for the page.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode

from metrion_addon.clock import iso_utc
from metrion_addon.config import PROVIDERS
from metrion_addon.queries import Cursor, Filters
from metrion_addon.report import parse_since, parse_status

PRESETS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
PERIODS = (*PRESETS, "month", "custom")
DEFAULT_PERIOD = "24h"
KEPT = ("period", "since", "until", "provider", "model", "token", "requester", "status")


@dataclass(frozen=True)
class View:
    """What the URL asks for: the filters, the chosen period's name, and the logs cursor if any."""

    filters: Filters
    period: str
    params: dict[str, str]  # the filter parameters as given, to carry from page to page
    cursor: Cursor | None = None
    offset: int = 0

    @property
    def query(self) -> str:
        return urlencode(self.params)

    def link(self, **extra: str | int) -> str:
        return "?" + urlencode({**self.params, **{k: str(v) for k, v in extra.items()}})


def _cursor(text: str, older: bool, now: datetime) -> Cursor:
    ts, sep, row_id = text.rpartition("~")
    if not sep or not row_id.isdigit():
        raise ValueError(f"not a page cursor: {text!r}")
    return Cursor(ts=parse_since(ts, now), id=int(row_id), older=older)


def read_view(query: Mapping[str, str], now: datetime, providers: Collection[str] = PROVIDERS) -> View:
    """The View a dashboard URL's query string describes; unknown presets or values raise ValueError.

    `providers`: the names a provider filter may take (the five and the config's own)."""
    params = {key: query[key].strip() for key in KEPT if query.get(key, "").strip()}
    period = params.get("period", DEFAULT_PERIOD)
    if period not in PERIODS:
        raise ValueError(f"unknown period {period!r} (choose from {', '.join(PERIODS)})")
    if period in PRESETS:
        since, until = now - PRESETS[period], now
    elif period == "month":
        since, until = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0), now
    else:
        since = datetime.fromisoformat(parse_since(params.get("since", "24h"), now).replace("Z", "+00:00"))
        until = datetime.fromisoformat(parse_since(params["until"], now).replace("Z", "+00:00")) \
            if "until" in params else now
    if since >= until:
        raise ValueError("the period ends before it starts")
    provider = params.get("provider")
    if provider is not None and provider not in providers:
        raise ValueError(f"unknown provider {provider!r} (known: {', '.join(providers)})")
    filters = Filters(
        since=iso_utc(since.timestamp()),
        until=iso_utc(until.timestamp()),
        provider=provider,
        model=params.get("model"),
        token=params.get("token"),
        requester=params.get("requester"),
        status=parse_status(params["status"]) if "status" in params else None,
    )
    cursor = None
    if query.get("older"):
        cursor = _cursor(query["older"], older=True, now=now)
    elif query.get("newer"):
        cursor = _cursor(query["newer"], older=False, now=now)
    offset = int(query["from"]) if query.get("from", "").isdigit() else 0
    return View(filters=filters, period=period, params=params, cursor=cursor, offset=offset)
