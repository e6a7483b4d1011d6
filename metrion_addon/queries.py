"""The query layer: totals, time series, percentiles and log pages for a period and filters, from the aggregates.

Whole days and hours come from `daily_*`/`hourly_*`; the partial hours at either end of a period from the raw rows,
folded by the same code the writer uses, so every total equals the raw rows for any period.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from metrion_addon import aggregates
from metrion_addon.aggregates import NANO, STORED_ROW_SELECT, USAGE_KEY, USAGE_SUMS, StoredRow
from metrion_addon.clock import iso_utc
from metrion_addon.report import IS_ERROR, LOG_COLUMNS, nearest_rank
from metrion_addon.store.database import columns

HOURLY_UP_TO = timedelta(hours=48)  # longer periods are charted by day
PAGE_SIZE = 50
PERCENTS = (50, 95, 99)
SUM_INDEX = {name: i for i, name in enumerate(USAGE_SUMS)}


@dataclass(frozen=True)
class Filters:
    """A period [since, until) as stored timestamps, and what the rows are narrowed to (None means any)."""

    since: str
    until: str
    provider: str | None = None
    model: str | None = None
    token: str | None = None
    requester: str | None = None
    status: tuple[int, int] | None = None

    @property
    def length(self) -> timedelta:
        return _moment(self.until) - _moment(self.since)

    @property
    def hourly(self) -> bool:
        return self.length <= HOURLY_UP_TO

    def previous(self) -> Filters:
        """The period of the same length just before this one, with the same narrowing."""
        return replace(self, since=iso_utc((_moment(self.since) - self.length).timestamp()), until=self.since)


def _moment(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def stamp(moment: datetime) -> str:
    return iso_utc(moment.timestamp())


def _floor(moment: datetime, unit: str) -> datetime:
    moment = moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if unit == "day" else moment


def _ceil(moment: datetime, unit: str) -> datetime:
    floor = _floor(moment, unit)
    return floor if floor == moment else floor + (timedelta(days=1) if unit == "day" else timedelta(hours=1))


@dataclass(frozen=True)
class Segment:
    """Part of a period read from one place: `hourly`/`daily` aggregates, or None for the raw rows."""

    level: str | None
    since: str
    until: str


def segments(f: Filters, by_hour: bool) -> list[Segment]:
    """The period cut into raw partial hours at the ends, whole hours, and (unless `by_hour`) whole days."""
    since, until = _moment(f.since), _moment(f.until)
    first_hour, last_hour = _ceil(since, "hour"), _floor(until, "hour")
    if first_hour >= last_hour:
        return [Segment(None, f.since, f.until)]
    parts = [Segment(None, f.since, stamp(first_hour))] if since < first_hour else []
    first_day, last_day = _ceil(first_hour, "day"), _floor(last_hour, "day")
    if by_hour or first_day >= last_day:
        parts.append(Segment("hourly", stamp(first_hour), stamp(last_hour)))
    else:
        if first_hour < first_day:
            parts.append(Segment("hourly", stamp(first_hour), stamp(first_day)))
        parts.append(Segment("daily", stamp(first_day), stamp(last_day)))
        if last_day < last_hour:
            parts.append(Segment("hourly", stamp(last_day), stamp(last_hour)))
    if last_hour < until:
        parts.append(Segment(None, stamp(last_hour), f.until))
    return parts


def _narrowing(f: Filters) -> tuple[list[str], list[Any]]:
    clauses, params = [], []
    for column, value in (
        ("provider", f.provider),
        ("token_name", f.token),
        ("requester", f.requester),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if f.model is not None:  # the model as asked or as answered (gpt-4o finds gpt-4o-2024-08-06), as `metrion logs`
        clauses.append("(model = ? OR requested_model = ?)")
        params.extend([f.model, f.model])
    if f.status is not None:
        clauses.append("status BETWEEN ? AND ?")
        params.extend(f.status)
    return clauses, params


def _raw_rows(conn: sqlite3.Connection, f: Filters, parts: list[Segment], columns: str) -> list[tuple]:
    """The raw rows of the segments that have no aggregate (`columns` selected), narrowed by the filters."""
    raw = [part for part in parts if part.level is None]
    if not raw:
        return []
    clauses, params = _narrowing(f)
    ranges = " OR ".join(["(ts >= ? AND ts < ?)"] * len(raw))
    sql = f"SELECT {columns} FROM requests WHERE {' AND '.join([f'({ranges})', *clauses])}"
    return conn.execute(sql, [*(value for part in raw for value in (part.since, part.until)), *params]).fetchall()


def _aggregate_rows(conn: sqlite3.Connection, f: Filters, parts: list[Segment], kind: str,
                    selected: dict[str, str], sums: str) -> list[tuple]:
    """Rows of the `kind` (usage/latency) aggregates over the segments, grouped by the selected expressions;
    `selected` maps a key to its SQL with `{time}` standing for the table's time column."""
    rows = []
    clauses, params = _narrowing(f)
    for part in parts:
        if part.level is None:
            continue
        time_column, cut = aggregates.LEVELS[part.level]
        whole = f"substr({time_column}, 1, {cut})"  # the column itself: SQLite can then group in key order
        columns = [expression.format(time=time_column).replace(whole, time_column) for expression in selected.values()]
        sql = (
            f"SELECT {''.join(f'{column}, ' for column in columns)}{sums} FROM {part.level}_{kind}"
            f" WHERE {' AND '.join([f'{time_column} >= ? AND {time_column} < ?', *clauses])}"
            + (f" GROUP BY {', '.join(columns)}" if columns else "")
        )
        rows.extend(conn.execute(sql, [part.since[:cut], part.until[:cut], *params]))
    return rows


_USAGE_SQL = {"hour": "{time}", "day": "substr({time}, 1, 10)"}


def usage(conn: sqlite3.Connection, f: Filters, keys: tuple[str, ...] = ()) -> dict[tuple, list[int]]:
    """The usage sums (USAGE_SUMS order) for the filter, grouped by `keys` (names in USAGE_KEY, or `day`)."""
    parts = segments(f, by_hour="hour" in keys)
    selected = {key: _USAGE_SQL.get(key, key) for key in keys}
    groups: dict[tuple, list[int]] = {}
    width = len(keys)
    for row in _aggregate_rows(conn, f, parts, "usage", selected, ", ".join(f"sum({n})" for n in USAGE_SUMS)):
        if row[width] is None:  # no keys and no rows still gives one all-NULL row
            continue
        into = groups.get(row[:width])
        if into is None:
            groups[row[:width]] = list(row[width:])
        else:
            for i, value in enumerate(row[width:]):
                into[i] += value
    picks = [(USAGE_KEY.index("hour"), 10) if key == "day" else (USAGE_KEY.index(key), None) for key in keys]
    edge_usage, _ = aggregates.fold(StoredRow(*row) for row in _raw_rows(conn, f, parts, STORED_ROW_SELECT))
    for key, sums in edge_usage.items():
        picked = tuple(key[i][:cut] if cut else key[i] for i, cut in picks)
        into = groups.setdefault(picked, [0] * len(USAGE_SUMS))
        for i, value in enumerate(sums):
            into[i] += value
    return groups


def totals(sums: list[int] | None) -> dict[str, Any]:
    """The figures a card, a table row or a report line shows, from one group's sums."""
    sums = sums or [0] * len(USAGE_SUMS)
    get = {name: sums[i] for name, i in SUM_INDEX.items()}
    requests = get["requests"]
    return {
        "requests": requests,
        "input_tokens": get["input_tokens"],
        "output_tokens": get["output_tokens"],
        "cached_tokens": get["cache_read_tokens"],
        "cache_write_tokens": get["cache_write_tokens"],
        "reasoning_tokens": get["reasoning_tokens"],
        "total_tokens": get["total_tokens"],
        "cost_usd": get["cost_nusd"] / NANO if get["priced"] else None,
        "unpriced": requests - get["priced"],
        "latency_avg_ms": round(get["latency_us"] / get["latency_count"] / 1000, 1) if get["latency_count"] else None,
        "ttfb_avg_ms": round(get["ttfb_us"] / get["ttfb_count"] / 1000, 1) if get["ttfb_count"] else None,
    }


def rollup(groups: dict[tuple, list[int]], keep: tuple[int, ...]) -> dict[tuple, list[int]]:
    """Groups summed over all but the key positions in `keep`."""
    merged: dict[tuple, list[int]] = {}
    for key, sums in groups.items():
        short = tuple(key[i] for i in keep)
        into = merged.get(short)
        if into is None:
            merged[short] = list(sums)
        else:
            for i, value in enumerate(sums):
                into[i] += value
    return merged


def with_errors(groups: dict[tuple, list[int]], width: int) -> list[dict[str, Any]]:
    """Rows from groups keyed (k1..kwidth, failed): totals, errors and error rate per (k1..kwidth)."""
    merged = rollup(groups, tuple(range(width)))
    failed = rollup({key: sums for key, sums in groups.items() if key[width]}, tuple(range(width)))
    rows = []
    for key, sums in merged.items():
        row = totals(sums)
        row["key"] = key
        row["errors"] = failed.get(key, [0])[0]
        row["error_rate"] = row["errors"] / row["requests"] if row["requests"] else None
        rows.append(row)
    return rows


def grouped(conn: sqlite3.Connection, f: Filters, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per group of `keys` with requests, errors, error rate, tokens, cost and average latency."""
    rows = []
    for row in with_errors(usage(conn, f, (*keys, "failed")), len(keys)):
        key = row.pop("key")
        rows.append({**{name: value or None for name, value in zip(keys, key, strict=True)}, **row})
    return rows


def buckets(f: Filters) -> list[str]:
    """The labels of the chart buckets covering the period: `2026-11-24T20` hours, or `2026-11-24` days."""
    unit, cut = ("hour", 13) if f.hourly else ("day", 10)
    step = timedelta(hours=1) if f.hourly else timedelta(days=1)
    moment, end = _floor(_moment(f.since), unit), _moment(f.until)
    labels = []
    while moment < end:
        labels.append(stamp(moment)[:cut])
        moment += step
    return labels


# ---------------------------------------------------------------- latency percentiles

def _raw_latencies(conn: sqlite3.Connection, f: Filters, keys: tuple[str, ...]) -> dict[tuple, list[float]]:
    """Each group's latencies in ascending order (SQLite sorts them)."""
    columns = {"time": f"substr(ts, 1, {13 if f.hourly else 10})", "provider": "provider",
               "model": "coalesce(model, '')"}
    selected = [columns[key] for key in keys]
    clauses, params = _narrowing(f)
    sql = (
        f"SELECT {''.join(f'{column}, ' for column in selected)}latency_ms FROM requests"
        f" WHERE {' AND '.join(['ts >= ? AND ts < ?', 'latency_ms IS NOT NULL', *clauses])}"
        f" ORDER BY {''.join(f'{column}, ' for column in selected)}latency_ms"
    )
    rows = conn.execute(sql, [f.since, f.until, *params]).fetchall()
    if not keys:
        return {(): [latency for (latency,) in rows]} if rows else {}
    width = len(keys)
    return {key: [row[width] for row in group] for key, group in itertools.groupby(rows, lambda row: row[:width])}


def _histograms(conn: sqlite3.Connection, f: Filters, keys: tuple[str, ...]) -> dict[tuple, dict[int, int]]:
    """Latency bucket counts per group of `keys` (among time, provider, model) over the period."""
    cut = 13 if f.hourly else 10
    parts = segments(f, by_hour=f.hourly and "time" in keys)
    columns = {"time": f"substr({{time}}, 1, {cut})", "provider": "provider", "model": "model"}
    selected = {key: columns[key] for key in keys} | {"bucket": "bucket"}
    counts: dict[tuple, dict[int, int]] = {}
    for *key, bucket, n in _aggregate_rows(conn, f, parts, "latency", selected, "sum(requests)"):
        histogram = counts.setdefault(tuple(key), {})
        histogram[bucket] = histogram.get(bucket, 0) + n
    raw_columns = {"time": f"substr(ts, 1, {cut})", "provider": "provider", "model": "coalesce(model, '')"}
    for *key, latency in _raw_rows(conn, f, parts, "".join(f"{raw_columns[k]}, " for k in keys) + "latency_ms"):
        if latency is not None:
            histogram = counts.setdefault(tuple(key), {})
            bucket = aggregates.latency_bucket(latency)
            histogram[bucket] = histogram.get(bucket, 0) + 1
    return counts


def histogram_rank(histogram: dict[int, int], percent: int) -> float:
    """The nearest-rank percentile of a latency histogram, reported as its bucket's middle."""
    rank = (percent * sum(histogram.values()) + 99) // 100
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return round(aggregates.bucket_estimate(bucket), 1)
    raise ValueError("empty histogram")


RAW_PERCENTILE_ROWS = 20_000  # up to this many latencies in the period, percentiles come from the raw rows


EXACT, ESTIMATED, UNAVAILABLE = "exact", "estimated", "unavailable"


def percentile_source(f: Filters, groups: dict[tuple, list[int]]) -> str:
    """Where a view's percentiles come from, given any usage `groups` of it (for its latency count):

    the raw rows (exact) when there are at most RAW_PERCENTILE_ROWS and an index reaches them (a status filter
    alone has none); else the histograms (estimated); with a requester filter, which the histograms do not key
    on, the raw rows or nothing.
    """
    counted = sum(sums[SUM_INDEX["latency_count"]] for sums in groups.values())
    small = counted <= RAW_PERCENTILE_ROWS
    if f.requester is not None:
        return EXACT if small else UNAVAILABLE
    indexed = f.status is None or any(v is not None for v in (f.provider, f.model, f.token))
    return EXACT if small and indexed else ESTIMATED


@dataclass(frozen=True)
class Latencies:
    """The period's latencies per group of keys: raw values when exact, else histograms."""

    source: str
    values: dict[tuple, list[float]]
    histograms: dict[tuple, dict[int, int]]

    def percentiles(self, keep: tuple[int, ...]) -> dict[tuple, dict[str, float]]:
        """p50/p95/p99 per group of the key positions in `keep` (() for all)."""
        result = {}
        if self.source == EXACT:
            merged: dict[tuple, list[float]] = {}
            for key, values in self.values.items():
                merged.setdefault(tuple(key[i] for i in keep), []).extend(values)
            for key, values in merged.items():
                if len(merged) > 1 or len(self.values) > 1:  # several sorted groups were joined
                    values.sort()
                result[key] = {f"p{p}": nearest_rank(values, p) for p in PERCENTS}
        else:
            for key, histogram in self._merged(keep).items():
                result[key] = {f"p{p}": histogram_rank(histogram, p) for p in PERCENTS}
        return result

    def _merged(self, keep: tuple[int, ...]) -> dict[tuple, dict[int, int]]:
        merged: dict[tuple, dict[int, int]] = {}
        for key, histogram in self.histograms.items():
            into = merged.setdefault(tuple(key[i] for i in keep), {})
            for bucket, n in histogram.items():
                into[bucket] = into.get(bucket, 0) + n
        return merged

    def octaves(self) -> list[dict[str, Any]]:
        """How many requests took how long: one bar per doubling of latency (1–2 ms, 2–4 ms, …)."""
        counts: dict[int, int] = {}
        if self.source == EXACT:
            for values in self.values.values():
                for value in values:
                    octave = math.frexp(value)[1] - 1 if value >= 1 else 0  # floor(log2), as the buckets
                    counts[octave] = counts.get(octave, 0) + 1
        else:
            for bucket, n in self._merged(()).get((), {}).items():
                octave = bucket // aggregates.BUCKETS_PER_DOUBLING
                counts[octave] = counts.get(octave, 0) + n
        if not counts:
            return []
        return [
            {"from_ms": 0 if octave == 0 else 2**octave, "to_ms": 2 ** (octave + 1), "requests": counts.get(octave, 0)}
            for octave in range(min(counts), max(counts) + 1)
        ]


def latencies(conn: sqlite3.Connection, f: Filters, keys: tuple[str, ...], source: str) -> Latencies:
    """Latencies grouped by `keys` (among time, provider, model) from `source` (see percentile_source): exact is
    nearest rank over the raw rows, as `metrion report`; estimated is a histogram bucket's middle (±4.5 %)."""
    if source == EXACT:
        return Latencies(source, _raw_latencies(conn, f, keys), {})
    if source == ESTIMATED:
        return Latencies(source, {}, _histograms(conn, f, keys))
    return Latencies(source, {}, {})


# ---------------------------------------------------------------- raw rows: logs and recent errors


@dataclass(frozen=True)
class Cursor:
    """Where a log page starts: after (`older`) or before (`newer`) the row with this ts and id."""

    ts: str
    id: int
    older: bool


def log_page(conn: sqlite3.Connection, f: Filters, cursor: Cursor | None, errors_only: bool = False,
             size: int = PAGE_SIZE) -> list[dict[str, Any]]:
    """One page of rows, newest first; the cursor pages by (ts, id), so deep pages cost what the first does.

    A model filter (the model answered or the one asked for) is read as two queries, each walking its own
    (model, ts) or (requested_model, ts) index in order, merged here without the rows both found: one query
    with `model = ? OR requested_model = ?` would collect and sort every matching row of the period first.
    """
    if f.model is None:
        rows = _log_rows(conn, f, cursor, errors_only, size, "")
    else:
        unnamed = replace(f, model=None)
        answered = _log_rows(conn, unnamed, cursor, errors_only, size, "model", f.model)
        seen = {row["id"] for row in answered}
        rows = answered + [row for row in _log_rows(conn, unnamed, cursor, errors_only, size, "requested_model",
                                                    f.model) if row["id"] not in seen]
    older = cursor is None or cursor.older
    rows.sort(key=lambda row: (row["ts"], row["id"]), reverse=older)
    rows = rows[:size]
    if not older:
        rows.reverse()
    return rows


def _log_rows(conn: sqlite3.Connection, f: Filters, cursor: Cursor | None, errors_only: bool, size: int,
              column: str, name: str | None = None) -> list[dict[str, Any]]:
    """Up to `size` rows from the cursor on (newest first, or oldest first when paging to newer rows), with
    `column` (model or requested_model) equal to `name` if a column is given."""
    clauses, params = _narrowing(f)
    clauses = ["ts >= ? AND ts < ?", *clauses, *([f"{column} = ?"] if column else [])]
    params = [f.since, f.until, *params, *([name] if column else [])]
    if errors_only:
        clauses.append(IS_ERROR)
    order = "DESC"
    if cursor is not None:
        sign = "<" if cursor.older else ">"
        clauses.append(f"(ts {sign} ? OR (ts = ? AND id {sign} ?))")
        params.extend([cursor.ts, cursor.ts, cursor.id])
        order = "DESC" if cursor.older else "ASC"
    sql = (
        f"SELECT {_log_select(conn)} FROM requests WHERE {' AND '.join(clauses)}"
        f" ORDER BY ts {order}, id {order} LIMIT ?"
    )
    return [_log_dict(row) for row in conn.execute(sql, [*params, size])]


def _log_select(conn: sqlite3.Connection) -> str:
    """LOG_COLUMNS, with NULL for any a database from an older Metrion does not have yet (it is read-only here)."""
    present = columns(conn, "requests")
    return ", ".join(name if name in present else "NULL" for name in LOG_COLUMNS)


def _log_dict(row: tuple) -> dict[str, Any]:
    found = dict(zip(LOG_COLUMNS, row, strict=True))
    found["stream"] = bool(found["stream"])
    return found


def log_row(conn: sqlite3.Connection, row_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_log_select(conn)} FROM requests WHERE id = ?", (row_id,)).fetchone()
    return None if row is None else _log_dict(row)
