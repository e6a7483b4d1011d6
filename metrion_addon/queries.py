"""The dashboard's query layer: totals, time series, percentiles and log pages for a filter, from the hourly aggregates.

Whole hours are read from `hourly_usage`/`hourly_latency`; the partial hours at either end of a period come from
the raw rows, folded by the same code the writer uses, so every total equals the raw rows for any period.
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
from metrion_addon.config import Config
from metrion_addon.report import IS_ERROR, LOG_COLUMNS, nearest_rank, quota

HOURLY_UP_TO = timedelta(hours=48)  # longer periods are charted by day
PAGE_SIZE = 50
PERCENTS = (50, 95, 99)
_SUM = {name: i for i, name in enumerate(USAGE_SUMS)}


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


def _stamp(moment: datetime) -> str:
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
    parts = [Segment(None, f.since, _stamp(first_hour))] if since < first_hour else []
    first_day, last_day = _ceil(first_hour, "day"), _floor(last_hour, "day")
    if by_hour or first_day >= last_day:
        parts.append(Segment("hourly", _stamp(first_hour), _stamp(last_hour)))
    else:
        if first_hour < first_day:
            parts.append(Segment("hourly", _stamp(first_hour), _stamp(first_day)))
        parts.append(Segment("daily", _stamp(first_day), _stamp(last_day)))
        if last_day < last_hour:
            parts.append(Segment("hourly", _stamp(last_day), _stamp(last_hour)))
    if last_hour < until:
        parts.append(Segment(None, _stamp(last_hour), f.until))
    return parts


def _narrowing(f: Filters) -> tuple[list[str], list[Any]]:
    clauses, params = [], []
    for column, value in (
        ("provider", f.provider),
        ("model", f.model),
        ("token_name", f.token),
        ("requester", f.requester),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
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
        columns = [expression.format(time=time_column) for expression in selected.values()]
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
    get = {name: sums[i] for name, i in _SUM.items()}
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


def _with_errors(groups: dict[tuple, list[int]], width: int) -> list[dict[str, Any]]:
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
    for row in _with_errors(usage(conn, f, (*keys, "failed")), len(keys)):
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
        labels.append(_stamp(moment)[:cut])
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


def exact_percentiles(f: Filters, groups: dict[tuple, list[int]]) -> bool:
    """Small periods (by the latency count in any usage `groups` of the period), and token or requester filters
    (the histograms key on neither), are answered from raw rows."""
    counted = sum(sums[_SUM["latency_count"]] for sums in groups.values())
    return f.requester is not None or f.token is not None or counted <= RAW_PERCENTILE_ROWS


@dataclass(frozen=True)
class Latencies:
    """The period's latencies per group of keys: raw values when exact, else histograms."""

    exact: bool
    values: dict[tuple, list[float]]
    histograms: dict[tuple, dict[int, int]]

    def percentiles(self, keep: tuple[int, ...]) -> dict[tuple, dict[str, float]]:
        """p50/p95/p99 per group of the key positions in `keep` (() for all)."""
        result = {}
        if self.exact:
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
        if self.exact:
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


def latencies(conn: sqlite3.Connection, f: Filters, keys: tuple[str, ...], exact: bool) -> Latencies:
    """Latencies grouped by `keys` (among time, provider, model): `exact` (nearest rank over the raw rows, as
    `metrion report`; see exact_percentiles), else histograms (a percentile is its bucket's middle: ±4.5 %)."""
    if exact:
        return Latencies(True, _raw_latencies(conn, f, keys), {})
    return Latencies(False, {}, _histograms(conn, f, keys))


# ---------------------------------------------------------------- raw rows: logs and recent errors


@dataclass(frozen=True)
class Cursor:
    """Where a log page starts: after (`older`) or before (`newer`) the row with this ts and id."""

    ts: str
    id: int
    older: bool


def log_page(conn: sqlite3.Connection, f: Filters, cursor: Cursor | None, errors_only: bool = False,
             size: int = PAGE_SIZE) -> list[dict[str, Any]]:
    """One page of rows, newest first; the cursor pages by (ts, id), so deep pages cost what the first does."""
    clauses, params = _narrowing(f)
    clauses = ["ts >= ? AND ts < ?", *clauses]
    params = [f.since, f.until, *params]
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
    rows = [_log_dict(row) for row in conn.execute(sql, [*params, size])]
    if order == "ASC":
        rows.reverse()
    return rows


def _log_select(conn: sqlite3.Connection) -> str:
    """LOG_COLUMNS, with NULL for any a database from an older Metrion does not have yet (it is read-only here)."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    return ", ".join(name if name in present else "NULL" for name in LOG_COLUMNS)


def _log_dict(row: tuple) -> dict[str, Any]:
    found = dict(zip(LOG_COLUMNS, row, strict=True))
    found["stream"] = bool(found["stream"])
    return found


def log_row(conn: sqlite3.Connection, row_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_log_select(conn)} FROM requests WHERE id = ?", (row_id,)).fetchone()
    return None if row is None else _log_dict(row)



# ---------------------------------------------------------------- one function per dashboard page

TOP_SERIES = 6  # charts stack this many models and put the rest under "other"


def change(now: float | None, before: float | None) -> float | None:
    """The relative change shown in a card's badge (+0.12 is +12 %); None when there is nothing to compare."""
    if now is None or before is None or before == 0:
        return None
    return round((now - before) / before, 4)


def _card(now: float | None, before: float | None) -> dict[str, Any]:
    return {"value": now, "previous": before, "change": change(now, before)}


def _headline(conn: sqlite3.Connection, f: Filters, by_failed: dict[tuple, list[int]],
              requesters: set[str]) -> dict[str, Any]:
    """Card figures from usage grouped by `failed`, and the period's requesters."""
    (figures,) = _with_errors(by_failed, 0) or [{**totals(None), "errors": 0, "error_rate": None}]
    figures.pop("key", None)
    figures["successes"] = figures["requests"] - figures["errors"]
    exact = exact_percentiles(f, by_failed)
    figures["latency_p95_ms"] = latencies(conn, f, (), exact).percentiles(()).get((), {}).get("p95")
    figures["percentiles_exact"] = exact
    figures["requesters"] = len(requesters)
    return figures


def _series(labels: list[str], values: dict[str, float]) -> list[float]:
    return [values.get(label, 0) for label in labels]


def _top(amounts: dict[str, float], n: int = TOP_SERIES) -> list[str]:
    return [name for name, _ in sorted(amounts.items(), key=lambda item: (-item[1], item[0]))[:n]]


def _time_key(f: Filters) -> str:
    return "hour" if f.hourly else "day"


def overview(conn: sqlite3.Connection, f: Filters) -> dict[str, Any]:
    """Cards with the change against the previous period, and the Overview charts."""
    keys = (_time_key(f), "provider", "model", "failed")
    previous = f.previous()
    groups = usage(conn, f, keys)
    people = {key for key in usage(conn, f, (keys[0], "requester")) if key[1]}
    now = _headline(conn, f, rollup(groups, (3,)), {name for _, name in people})
    earlier = usage(conn, previous, ("requester", "failed"))
    before = _headline(conn, previous, rollup(earlier, (1,)), {name for name, _ in earlier if name})
    cards = {
        name: _card(now[name], before[name])
        for name in ("requests", "successes", "errors", "error_rate", "cost_usd", "input_tokens", "output_tokens",
                     "cached_tokens", "latency_avg_ms", "latency_p95_ms", "requesters")
    }
    labels = buckets(f)
    by_time = {key: totals(sums) | {"errors": 0} for key, sums in rollup(groups, (0,)).items()}
    for (label,), sums in rollup({k: v for k, v in groups.items() if k[3]}, (0,)).items():
        by_time[(label,)]["errors"] = sums[0]
    column = {label: by_time.get((label,), totals(None) | {"errors": 0}) for label in labels}
    cost_by_model: dict[str, dict[str, float]] = {}
    for (label, model), sums in rollup(groups, (0, 2)).items():
        cost_by_model.setdefault(model or "(unknown)", {})[label] = sums[_SUM["cost_nusd"]]
    model_cost = {model: sum(values.values()) for model, values in cost_by_model.items()}
    shown = _top(model_cost)
    stacked = {model: _series(labels, cost_by_model[model]) for model in shown}
    rest = [model for model in cost_by_model if model not in shown]
    if rest:
        stacked["other"] = [sum(cost_by_model[m].get(label, 0) for m in rest) for label in labels]
    provider_cost = {provider: sums[_SUM["cost_nusd"]] for (provider,), sums in rollup(groups, (1,)).items()}
    model_requests = {model or "(unknown)": sums[0] for (model,), sums in rollup(groups, (2,)).items()}
    all_cost = sum(provider_cost.values())
    requesters: dict[str, int] = {}
    for label, _ in people:
        requesters[label] = requesters.get(label, 0) + 1
    return {
        "cards": cards,
        "bucket": keys[0],
        "labels": labels,
        "requests": {
            "successes": [column[label]["requests"] - column[label]["errors"] for label in labels],
            "errors": [column[label]["errors"] for label in labels],
        },
        "tokens": {
            "input": [column[label]["input_tokens"] for label in labels],
            "output": [column[label]["output_tokens"] for label in labels],
            "cached": [column[label]["cached_tokens"] for label in labels],
        },
        "cost_by_model": {model: [v / NANO for v in values] for model, values in stacked.items()},
        "cost_by_provider": [
            {"provider": provider, "cost_usd": cost / NANO, "share": cost / all_cost if all_cost else None}
            for provider, cost in sorted(provider_cost.items(), key=lambda item: -item[1])
        ],
        "top_models": [{"model": model, "requests": model_requests[model]} for model in _top(model_requests, 8)],
        "requesters": _series(labels, requesters),
        "percentiles_exact": now["percentiles_exact"],
    }


def latency(conn: sqlite3.Connection, f: Filters) -> dict[str, Any]:
    """Latency percentiles and average TTFB over time, the same per provider and model, and a histogram."""
    labels = buckets(f)
    groups = usage(conn, f, (_time_key(f), "provider", "model", "failed"))
    exact = exact_percentiles(f, groups)
    found = latencies(conn, f, ("time",), exact)
    over_time = found.percentiles((0,))
    averages = {label: totals(sums) for (label,), sums in rollup(groups, (0,)).items()}
    series = {f"p{p}": [over_time.get((label,), {}).get(f"p{p}") for label in labels] for p in PERCENTS}
    series["ttfb_avg"] = [averages.get(label, {}).get("ttfb_avg_ms") for label in labels]
    by_model = latencies(conn, f, ("provider", "model"), exact).percentiles((0, 1))
    table = []
    for row in _with_errors(rollup(groups, (1, 2, 3)), 2):
        provider, model = row.pop("key")
        table.append({"provider": provider, "model": model or None, **row, **by_model.get((provider, model), {})})
    table.sort(key=lambda row: -row["requests"])
    overall = found.percentiles(()).get((), {})
    everything = totals(rollup(groups, ()).get(()))
    return {
        "labels": labels,
        "bucket": _time_key(f),
        "series": series,
        "overall": {**{f"p{p}": overall.get(f"p{p}") for p in PERCENTS},
                    "latency_avg_ms": everything["latency_avg_ms"], "ttfb_avg_ms": everything["ttfb_avg_ms"]},
        "by_model": table,
        "histogram": found.octaves(),
        "percentiles_exact": found.exact,
    }


def errors(conn: sqlite3.Connection, f: Filters) -> dict[str, Any]:
    """Errors over time by status, Metrion's own apart from the provider's, and the 50 most recent."""
    labels = buckets(f)
    groups = usage(conn, f, (_time_key(f), "status", "own", "failed"))
    series: dict[str, dict[str, float]] = {}
    by_status: dict[tuple[int | None, str], int] = {}
    for (label, status, own, failed), sums in groups.items():
        if not failed:
            continue
        origin = "metrion" if own else "provider"
        name = f"{status or 'no status'} ({'Metrion' if own else 'provider'})"
        into = series.setdefault(name, {})
        into[label] = into.get(label, 0) + sums[0]
        by_status[(status or None, origin)] = by_status.get((status or None, origin), 0) + sums[0]
    requests = totals(rollup(groups, ()).get(()))["requests"]
    count = sum(by_status.values())
    return {
        "labels": labels,
        "bucket": _time_key(f),
        "series": {name: _series(labels, values) for name, values in sorted(series.items())},
        "errors": count,
        "requests": requests,
        "error_rate": count / requests if requests else None,
        "metrion_errors": sum(n for (_, origin), n in by_status.items() if origin == "metrion"),
        "provider_errors": sum(n for (_, origin), n in by_status.items() if origin == "provider"),
        "by_status": [
            {"status": status, "origin": origin, "errors": n}
            for (status, origin), n in sorted(by_status.items(), key=lambda item: -item[1])
        ],
        "recent": log_page(conn, f, None, errors_only=True),
    }


def _month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def costs(conn: sqlite3.Connection, f: Filters, now: datetime) -> dict[str, Any]:
    """Cost by model, provider, token and requester for the period, and this month so far against last month."""
    names = ("model", "provider", "token_name", "requester")
    groups = usage(conn, f, (*names, "failed"))
    tables = {}
    for i, key in enumerate(names):
        rows = []
        for row in _with_errors(rollup(groups, (i, 4)), 1):
            (name,) = row.pop("key")
            rows.append({"name": name or None, **row})
        rows.sort(key=lambda row: (-(row["cost_usd"] or 0), -row["requests"]))
        tables["token" if key == "token_name" else key] = rows
    this_month = _month_start(now)
    last_month = _month_start(this_month - timedelta(days=1))
    same_point = min(last_month + (now - this_month), this_month)

    def spent(since: datetime, until: datetime) -> float | None:
        if since >= until:
            return None
        return totals(usage(conn, replace(f, since=_stamp(since), until=_stamp(until))).get(()))["cost_usd"]

    month_so_far, last_to_date = spent(this_month, now), spent(last_month, same_point)
    return {
        "total": totals(rollup(groups, ()).get(())),
        "tables": tables,
        "month": {
            "this_month": this_month.strftime("%Y-%m"),
            "so_far_usd": month_so_far,
            "last_month": last_month.strftime("%Y-%m"),
            "last_month_usd": spent(last_month, this_month),
            "last_month_same_point_usd": last_to_date,
            "change": change(month_so_far, last_to_date),
        },
    }


def tokens(conn: sqlite3.Connection, config: Config, f: Filters, now: datetime) -> list[dict[str, Any]]:
    """Each configured token (by name only) with its plan, month's use against its cap, reset date, rate-limit
    state now, and its requests and cost in the period."""
    saved = dict(
        (name, (level, updated)) for name, level, updated in conn.execute(
            "SELECT token_name, tokens, updated_at FROM rate_buckets"
        )
    )
    period = {row["token_name"]: row for row in grouped(conn, replace(f, token=None), ("token_name",))}
    limit = config.rate_limit
    rows = []
    for row in quota(conn, config, now):
        level, updated = saved.get(row["token"], (limit, now.timestamp()))
        available = min(limit, level + max(0.0, now.timestamp() - updated) * limit / 60)
        used = period.get(row["token"], {})
        rows.append({
            **row,
            "used_share": row["requests"] / row["cap"] if row["cap"] else None,
            "rate_limit": limit,
            "rate_available": int(available),
            "rate_limited": available < 1,
            "period_requests": used.get("requests", 0),
            "period_errors": used.get("errors", 0),
            "period_cost_usd": used.get("cost_usd"),
        })
    return rows


def filter_choices(conn: sqlite3.Connection, config: Config, f: Filters) -> dict[str, list[str]]:
    """What the filter bar offers: the models, tokens and requesters seen in the period, and the providers."""
    seen = usage(conn, Filters(f.since, f.until), ("provider", "model", "token_name", "requester"))
    pick = {name: sorted({key[i] for key in seen if key[i]}) for i, name in
            enumerate(("provider", "model", "token", "requester"))}
    pick["token"] = sorted(set(pick["token"]) | {token.name for token in config.tokens})
    pick["provider"] = sorted(set(pick["provider"]) | set(config.providers))
    return pick


def _mark(row: dict[str, Any]) -> str:
    return f"{row['ts']}~{row['id']}"


def logs(conn: sqlite3.Connection, f: Filters, cursor: Cursor | None, offset: int) -> dict[str, Any]:
    """A page of 50 rows, newest first, the total for the filter, and the cursors of the pages either side."""
    rows = log_page(conn, f, cursor)
    total = totals(usage(conn, f).get(()))["requests"]
    return {
        "total": total,
        "first": offset + 1 if rows else 0,
        "last": offset + len(rows),
        "rows": rows,
        "older": _mark(rows[-1]) if rows and offset + len(rows) < total else None,
        "newer": _mark(rows[0]) if rows and offset > 0 else None,
        "page_size": PAGE_SIZE,
    }
