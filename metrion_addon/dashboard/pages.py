"""One function per dashboard page: the data its template shows and its JSON endpoint returns.

Each reads through the query layer (queries.py) for a period and filters, and returns plain data for the wire.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import redis

from metrion_addon import shared_limits
from metrion_addon.aggregates import NANO
from metrion_addon.config import Config
from metrion_addon.queries import (
    PAGE_SIZE,
    PERCENTS,
    SUM_INDEX,
    Cursor,
    Filters,
    buckets,
    grouped,
    latencies,
    log_page,
    percentile_source,
    rollup,
    stamp,
    totals,
    usage,
    with_errors,
)
from metrion_addon.report import quota

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
    (figures,) = with_errors(by_failed, 0) or [{**totals(None), "errors": 0, "error_rate": None}]
    figures.pop("key", None)
    figures["successes"] = figures["requests"] - figures["errors"]
    source = percentile_source(f, by_failed)
    figures["latency_p95_ms"] = latencies(conn, f, (), source).percentiles(()).get((), {}).get("p95")
    figures["percentiles"] = source
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
        cost_by_model.setdefault(model or "(unknown)", {})[label] = sums[SUM_INDEX["cost_nusd"]]
    model_cost = {model: sum(values.values()) for model, values in cost_by_model.items()}
    shown = _top(model_cost)
    stacked = {model: _series(labels, cost_by_model[model]) for model in shown}
    rest = [model for model in cost_by_model if model not in shown]
    if rest:
        stacked["other"] = [sum(cost_by_model[m].get(label, 0) for m in rest) for label in labels]
    provider_cost = {provider: sums[SUM_INDEX["cost_nusd"]] for (provider,), sums in rollup(groups, (1,)).items()}
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
        "percentiles": now["percentiles"],
    }


def latency(conn: sqlite3.Connection, f: Filters) -> dict[str, Any]:
    """Latency percentiles and average TTFB over time, the same per provider and model, and a histogram."""
    labels = buckets(f)
    groups = usage(conn, f, (_time_key(f), "provider", "model", "failed"))
    source = percentile_source(f, groups)
    found = latencies(conn, f, ("time", "provider", "model"), source)
    over_time = found.percentiles((0,))
    averages = {label: totals(sums) for (label,), sums in rollup(groups, (0,)).items()}
    series = {f"p{p}": [over_time.get((label,), {}).get(f"p{p}") for label in labels] for p in PERCENTS}
    series["ttfb_avg"] = [averages.get(label, {}).get("ttfb_avg_ms") for label in labels]
    by_model = found.percentiles((1, 2))
    table = []
    for row in with_errors(rollup(groups, (1, 2, 3)), 2):
        provider, model = row.pop("key")
        table.append({"provider": provider, "model": model or None, **row, **{f"p{p}": None for p in PERCENTS},
                      **by_model.get((provider, model), {})})
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
        "percentiles": source,
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
        for row in with_errors(rollup(groups, (i, 4)), 1):
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
        return totals(usage(conn, replace(f, since=stamp(since), until=stamp(until))).get(()))["cost_usd"]

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


def rate_buckets(conn: sqlite3.Connection, config: Config) -> dict[str, tuple[float, float]] | None:
    """Each token's rate bucket (level, updated): from Redis when the limits are shared there (each instance's
    database holds none), else as the proxy last saved it; None when Redis does not answer."""
    if config.shared is not None:
        try:
            return shared_limits.bucket_levels(config.shared.redis, [token.name for token in config.tokens])
        except redis.RedisError:
            return None
    query = "SELECT token_name, tokens, updated_at FROM rate_buckets"
    return {name: (level, updated) for name, level, updated in conn.execute(query)}


def tokens(conn: sqlite3.Connection, config: Config, f: Filters, now: datetime) -> list[dict[str, Any]]:
    """Each configured token (by name only) with its plan, month's use against its cap, reset date, rate-limit
    state now, and its requests and cost in the period."""
    saved = rate_buckets(conn, config)
    period = {row["token_name"]: row for row in grouped(conn, replace(f, token=None), ("token_name",))}
    limit = config.rate_limit
    rows = []
    for row in quota(conn, config, now):
        available = None
        if saved is not None:
            level, updated = saved.get(row["token"], (limit, now.timestamp()))
            available = min(limit, level + max(0.0, now.timestamp() - updated) * limit / 60)
        used = period.get(row["token"], {})
        rows.append({
            **row,
            "used_share": row["requests"] / row["cap"] if row["cap"] else None,
            "rate_limit": limit,
            "rate_available": None if available is None else int(available),
            "rate_limited": None if available is None else available < 1,
            "period_requests": used.get("requests", 0),
            "period_errors": used.get("errors", 0),
            "period_cost_usd": used.get("cost_usd"),
        })
    return rows


def filter_choices(conn: sqlite3.Connection, config: Config, f: Filters) -> dict[str, list[str]]:
    """What the filter bar offers: the models (as answered and as asked), tokens and requesters seen in the period,
    and the providers."""
    seen = usage(conn, Filters(f.since, f.until), ("provider", "model", "token_name", "requester", "requested_model"))
    pick = {name: sorted({key[i] for key in seen if key[i]}) for i, name in
            enumerate(("provider", "model", "token", "requester"))}
    pick["model"] = sorted(set(pick["model"]) | {key[4] for key in seen if key[4]})
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
