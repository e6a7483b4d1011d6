"""Read-side queries over the request log: grouped reports, the latest rows, and each token's monthly quota.

Plain functions over a connection to either database (store.read_only) returning rows as dicts; cli.py formats them.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from metrion_addon.clock import iso_utc
from metrion_addon.config import Config
from metrion_addon.store import has_table

GROUPS = {
    "token": "token_name",
    "provider": "provider",
    "model": "model",
    "requester": "requester",
    "day": "substr(ts, 1, 10)",
    "status": "status",
}
REPORT_COLUMNS = [
    "requests",
    "errors",
    "error_rate",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "cost_usd",
    "latency_p50_ms",
    "latency_p95_ms",
]
LOG_COLUMNS = [
    "id",
    "ts",
    "token_name",
    "requester",
    "provider",
    "model",
    "requested_model",
    "path",
    "method",
    "stream",
    "status",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "latency_ms",
    "ttfb_ms",
    "usage_source",
    "error",
    "auth_mode",
    "cost_usd",
    "price_source",
    "cached",
    "saved_usd",
    "cache_status",
    "uid",
]
QUOTA_COLUMNS = ["token", "plan", "month", "requests", "cap", "remaining", "budget_usd", "spent_usd", "reserved_usd",
                 "remaining_usd", "resets"]
_NANO = 1_000_000_000
IS_ERROR = "(status >= 400 OR status IS NULL OR error IS NOT NULL)"
_RELATIVE = re.compile(r"(\d+)([dhm])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
_STATUS = re.compile(r"([1-5])(xx|\d\d)")


def parse_since(text: str, now: datetime) -> str:
    """A `--since`/`--until` value as a stored timestamp: `7d`, `24h`, `30m` before `now`, a UTC date, or ISO 8601."""
    text = text.strip()
    if match := _RELATIVE.fullmatch(text):
        return iso_utc((now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})).timestamp())
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (expected 7d, 24h, 30m, a date like 2026-11-01, or an ISO 8601 time)"
        ) from None
    return iso_utc((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def parse_status(text: str) -> tuple[int, int]:
    """A `--status` filter as an inclusive range: `429` is (429, 429), `4xx` is (400, 499)."""
    match = _STATUS.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"not a status: {text!r} (expected a code like 429 or a class like 4xx)")
    if match.group(2) == "xx":
        low = int(match.group(1)) * 100
        return low, low + 99
    code = int(match.group(0))
    return code, code


def nearest_rank(ordered: list[float], percent: int) -> float:
    """The nearest-rank percentile: the value at 1-based rank ceil(percent/100 × n) of the ascending values."""
    return ordered[(percent * len(ordered) + 99) // 100 - 1]


class _LatencyPercentiles:
    """SQLite aggregate: JSON [p50, p95] of a group's non-NULL latencies, or NULL if it has none."""

    def __init__(self) -> None:
        self.values: list[float | None] = []
        self.step = self.values.append  # a bound builtin: the cheapest per-row call SQLite can make into Python

    def finalize(self) -> str | None:
        ordered = sorted(value for value in self.values if value is not None)
        return json.dumps([nearest_rank(ordered, 50), nearest_rank(ordered, 95)]) if ordered else None


def _latency_percentiles(conn: Any) -> tuple[str, Callable[[Any], tuple[float | None, float | None]]]:
    """The SQL that gathers a group's latencies and how to read p50/p95 from it: the one place the dialects differ.

    SQLite runs a Python aggregate; PostgreSQL sends the group's latencies in order. Both are nearest rank.
    """
    if isinstance(conn, sqlite3.Connection):
        conn.create_aggregate("latency_percentiles", 1, _LatencyPercentiles)
        return "latency_percentiles(latency_ms)", lambda found: tuple(json.loads(found)) if found else (None, None)

    def ranks(ordered: list[float] | None) -> tuple[float | None, float | None]:
        return (nearest_rank(ordered, 50), nearest_rank(ordered, 95)) if ordered else (None, None)

    return "array_agg(latency_ms ORDER BY latency_ms) FILTER (WHERE latency_ms IS NOT NULL)", ranks


def _time_range(since: str | None, until: str | None) -> tuple[str, list[str]]:
    clauses, params = [], []
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    if until is not None:
        clauses.append("ts < ?")
        params.append(until)
    return " AND ".join(clauses) or "1 = 1", params


def report(conn: Any, since: str | None, until: str | None, by: list[str]) -> list[dict[str, Any]]:
    """One row per group of `by` (all requests in one row if empty) over since <= ts < until.

    Latency percentiles are nearest-rank over the group's rows that have a latency. Rows come busiest first,
    or in date order when grouped by day.
    """
    names = list(dict.fromkeys(by))
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {unknown[0]!r} (choose from {', '.join(GROUPS)})")
    keys = [GROUPS[name] for name in names]
    where, params = _time_range(since, until)
    ordered = [f"{key} NULLS FIRST" for key in keys]  # where both databases put NULL keys: first
    order = ordered if "day" in names else ["count(*) DESC", *ordered]
    percentiles, read_percentiles = _latency_percentiles(conn)
    sql = (
        f"SELECT {''.join(f'{key}, ' for key in keys)}count(*), count(*) FILTER (WHERE {IS_ERROR}),"
        " coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), coalesce(sum(cache_read_tokens), 0),"
        f" sum(cost_usd), {percentiles} FROM requests WHERE {where}"
        + (f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(order)}" if keys else "")
    )
    rows = []
    for row in conn.execute(sql, params):
        requests, errors, input_tokens, output_tokens, cached, cost, latency = row[len(keys) :]
        if not requests:
            continue  # without --by, an empty range still yields one all-NULL aggregate row
        p50, p95 = read_percentiles(latency)
        rows.append(
            {
                **dict(zip(names, row[: len(keys)], strict=True)),
                "requests": requests,
                "errors": errors,
                "error_rate": errors / requests,
                "input_tokens": int(input_tokens),
                "output_tokens": int(output_tokens),
                "cached_tokens": int(cached),
                "cost_usd": cost,
                "latency_p50_ms": p50,
                "latency_p95_ms": p95,
            }
        )
    return rows


@dataclass(frozen=True)
class LogFilter:
    """What `metrion logs` narrows the rows to; None means any."""

    token: str | None = None
    provider: str | None = None
    model: str | None = None
    status: tuple[int, int] | None = None
    requester: str | None = None
    since: str | None = None
    until: str | None = None


def logs(conn: Any, limit: int, filters: LogFilter) -> list[dict[str, Any]]:
    """The latest `limit` rows matching `filters` (since <= ts < until), newest first, with every stored column."""
    where, params = _time_range(filters.since, filters.until)
    clauses = [where]
    for column, value in (
        ("token_name", filters.token),
        ("provider", filters.provider),
        ("requester", filters.requester),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if filters.model is not None:  # the model as asked or as answered (gpt-4o finds gpt-4o-2024-08-06)
        clauses.append("(model = ? OR requested_model = ?)")
        params.extend([filters.model, filters.model])
    if filters.status is not None:
        clauses.append("status BETWEEN ? AND ?")
        params.extend(filters.status)
    where = " AND ".join(clauses)
    sql = f"SELECT {', '.join(LOG_COLUMNS)} FROM requests WHERE {where} ORDER BY ts DESC, id DESC LIMIT ?"
    rows = [dict(zip(LOG_COLUMNS, row, strict=True)) for row in conn.execute(sql, [*params, limit])]
    for row in rows:
        row["stream"] = bool(row["stream"])
        row["cached"] = bool(row["cached"])
    return rows


def next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def quota(conn: Any, config: Config, now: datetime, name: str | None = None,
          shared: Mapping[str, tuple[int, int, int]] | None = None) -> list[dict[str, Any]]:
    """Each configured token's plan, requests and dollars this UTC month against its cap and budget, and the reset date.

    Dollars: `spent_usd` settled, `reserved_usd` held by requests in flight (or never settled), `remaining_usd` left.
    `shared`: {token: (requests, spent, reserved nano-USD)} from Redis, the counts of every instance, used instead
    of this instance's database.
    """
    tokens = [token for token in config.tokens if name is None or token.name == name]
    if name is not None and not tokens:
        raise ValueError(f"no token named {name!r} in {config.path}")
    today = now.astimezone(UTC).date()
    month = today.strftime("%Y-%m")
    used = dict(conn.execute("SELECT token_name, requests FROM monthly_usage WHERE month = ?", (month,)))
    budgets: dict[str, tuple[int, int]] = {}
    if has_table(conn, "budget_usage"):
        query = "SELECT token_name, spent_nanousd, reserved_nanousd FROM budget_usage WHERE month = ?"
        budgets = {name: (spent, reserved) for name, spent, reserved in conn.execute(query, (month,))}
    if shared is not None:
        used = {name: requests for name, (requests, _, _) in shared.items()}
        budgets = {name: (spent, reserved) for name, (_, spent, reserved) in shared.items()}
    rows = []
    for token in tokens:
        cap = config.plans[token.plan].monthly_requests
        requests = used.get(token.name, 0)
        budget = config.budget_usd(token)
        spent, reserved = budgets.get(token.name, (0, 0))
        rows.append(
            {
                "token": token.name,
                "plan": token.plan,
                "month": month,
                "requests": requests,
                "cap": cap,
                "remaining": None if cap is None else max(cap - requests, 0),
                "budget_usd": budget,
                "spent_usd": spent / _NANO,
                "reserved_usd": reserved / _NANO,
                "remaining_usd": None if budget is None else max(0.0, (int(budget * _NANO) - spent - reserved) / _NANO),
                "resets": next_month(today).isoformat(),
            }
        )
    return rows
