"""Alert rules: what a rule measures over its period, which level it has reached, and whether that level is due.

Pure functions of the rule, the clock and the aggregates (read through queries.py); delivery lives in notify.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from metrion_addon import aggregates, queries
from metrion_addon.aggregates import NANO, USAGE_SUMS
from metrion_addon.clock import iso_utc
from metrion_addon.report import nearest_rank
from metrion_addon.store import has_table, latest_alerts

if TYPE_CHECKING:
    from metrion_addon.config import AlertRule, Config

LEVELS = (("alert", 1.0), ("warning", 0.9))  # highest first: a rule reports the highest level it reached
UPSTREAM_FAILURES = (502, 504)  # Metrion's own answers when the provider was unreachable or silent
_REQUESTS, _COST = (USAGE_SUMS.index(name) for name in ("requests", "cost_nusd"))


# --- what a rule measures


def _in_scope(value: str, allowed: Iterable[str] | None) -> bool:
    return allowed is None or value in allowed


def value_of(rule: AlertRule, usage: Mapping[tuple, list[int]], p95: float | None = None) -> float | None:
    """The rule's current value from usage sums keyed (provider, token_name, status, own), or the p95 latency
    of its scope; None when there is nothing to measure (no request, for a rate or a percentile)."""
    rows = [(key, sums) for key, sums in usage.items()
            if _in_scope(key[0], rule.providers) and _in_scope(key[1], rule.tokens)]
    if rule.type == "budget":
        return sum(sums[_COST] for _, sums in rows) / NANO
    if rule.type == "request_volume":
        return float(sum(sums[_REQUESTS] for _, sums in rows))
    if rule.type == "latency_p95":
        return p95
    # error_rate: the provider's own 4xx/5xx, and the requests Metrion could not deliver (502/504), among every
    # request that was sent to a provider; Metrion's refusals (401, 429, 403 ...) are policy, not provider health.
    sent = failed = 0
    for (_, _, status, own), sums in rows:
        if own and status not in UPSTREAM_FAILURES:
            continue
        sent += sums[_REQUESTS]
        if status >= 400:
            failed += sums[_REQUESTS]
    if rule.unit == "count":
        return float(failed)
    return failed * 100 / sent if sent else None


def level_of(value: float | None, threshold: float) -> str | None:
    """`alert` at 100 % of the threshold, `warning` at 90 %, else None."""
    if value is None:
        return None
    return next((level for level, share in LEVELS if value >= threshold * share), None)


@dataclass(frozen=True)
class Notified:
    """When a rule last notified a level, and in which period."""

    at: float
    period: float | None


def due(level: str | None, last: Notified | None, period: float | None, now: float, cooldown: float) -> bool:
    """Whether `level` should notify now: never yet, in a new period, or once the cooldown has passed."""
    if level is None:
        return False
    return last is None or last.period != period or now - last.at >= cooldown


@dataclass(frozen=True)
class Measurement:
    rule: str
    value: float | None
    level: str | None
    period_start: float
    period_end: float
    period_key: float | None


def measure(conn: sqlite3.Connection, rule: AlertRule, now: float) -> Measurement:
    """The rule's value now, read from the aggregates through the dashboard's query layer (whole hours from
    hourly/daily tables, the partial hours at the ends from raw rows): never a scan of the whole log."""
    start, end = rule.period.bounds(now)
    filters = queries.Filters(since=iso_utc(start), until=iso_utc(min(now, end) + 0.001))
    usage: dict[tuple, list[int]] = {}
    p95 = None
    if rule.type == "latency_p95":
        p95 = _p95(conn, rule, filters)
    else:
        usage = queries.usage(conn, filters, ("provider", "token_name", "status", "own"))
    value = value_of(rule, usage, p95)
    return Measurement(rule.name, value, level_of(value, rule.threshold), start, end, rule.period.key(now))


def _p95(conn: sqlite3.Connection, rule: AlertRule, filters: queries.Filters) -> float | None:
    """The p95 latency over the rule's scope, as the dashboard computes it: exact over the raw rows of small
    periods, else from the latency histograms (within 4.5 %)."""
    values: list[float] = []
    histogram: dict[int, int] = {}
    for provider in rule.providers or (None,):
        for token in rule.tokens or (None,):
            scoped = replace(filters, provider=provider, token=token)
            source = queries.percentile_source(scoped, queries.usage(conn, scoped))
            found = queries.latencies(conn, scoped, (), source)
            values.extend(value for group in found.values.values() for value in group)
            for counts in found.histograms.values():
                for bucket, n in counts.items():
                    histogram[bucket] = histogram.get(bucket, 0) + n
    if histogram:  # some of the scope only has histograms: count the exact values into buckets too
        for value in values:
            bucket = aggregates.latency_bucket(value)
            histogram[bucket] = histogram.get(bucket, 0) + 1
        return queries.histogram_rank(histogram, 95)
    return nearest_rank(sorted(values), 95) if values else None


# --- what a notification says


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "no data"
    if unit == "usd":
        return f"${value:,.2f}"
    if unit == "percent":
        return f"{value:.1f}%"
    if unit == "ms":
        return f"{value:,.0f} ms"
    return f"{value:,.0f} {unit}"


def payload(rule: AlertRule, measured: Measurement, level: str, test: bool = False) -> dict:
    """The JSON a webhook receives (Slack-compatible `text` included), also the source of the email."""
    scope = {"providers": rule.providers, "tokens": rule.tokens}
    share = "" if measured.value is None else f", {measured.value / rule.threshold:.0%} of the threshold"
    where = [f"providers {', '.join(rule.providers)}"] if rule.providers else []
    where += [f"tokens {', '.join(rule.tokens)}"] if rule.tokens else []
    sentence = (
        f"{'[TEST] ' if test else ''}Metrion {level.upper()}: rule {rule.name} ({rule.type}) is at "
        f"{format_value(measured.value, rule.unit)}{share} of {format_value(rule.threshold, rule.unit)} over "
        f"{rule.period.describe()}{' for ' + '; '.join(where) if where else ''}."
        + (" This is a test notification sent by `metrion alerts test`; nothing crossed a threshold." if test else "")
    )
    return {
        "text": sentence,
        "rule": rule.name,
        "type": rule.type,
        "level": level,
        "test": test,
        "value": measured.value,
        "threshold": rule.threshold,
        "unit": rule.unit,
        "period": {"start": iso_utc(measured.period_start), "end": iso_utc(measured.period_end),
                   "description": rule.period.describe()},
        "scope": scope,
    }


STATUS_COLUMNS = ["rule", "type", "value", "threshold", "unit", "level", "period_start", "period_end",
                  "last_notified", "last_level"]


def status(conn: sqlite3.Connection, config: Config, now: float) -> list[dict]:
    """Each rule's value now, threshold, level (ok, warning, alert) and its latest notification: what
    `metrion alerts status` prints and the dashboard's Alerts page shows."""
    latest = latest_alerts(conn) if has_table(conn, "alert_events") else {}
    rows = []
    for rule in config.alerts.rules:
        measured = measure(conn, rule, now)
        last_ts, last_level = latest.get(rule.name, (None, None))
        rows.append({"rule": rule.name, "type": rule.type, "value": measured.value, "threshold": rule.threshold,
                     "unit": rule.unit, "level": measured.level or "ok",
                     "period_start": iso_utc(measured.period_start), "period_end": iso_utc(measured.period_end),
                     "last_notified": last_ts, "last_level": last_level})
    return rows
