"""How the dashboard writes numbers: money with enough digits for tiny costs, counts, milliseconds, changes.

Pure functions, registered as Jinja2 filters; None (nothing to show) is an em dash everywhere.
"""

from __future__ import annotations

from metrion_addon.alerts import format_value

NOTHING = "—"


def usd(value: float | None) -> str:
    if value is None:
        return NOTHING
    if value == 0 or abs(value) >= 1:
        return f"${value:,.2f}"
    if abs(value) >= 0.01:
        return f"${value:.4f}"
    return f"${value:.6f}"


def count(value: int | None) -> str:
    if value is None:
        return NOTHING
    for threshold, unit, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e5, 1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / unit:.1f}{suffix}"
    return f"{value:,}"


def ms(value: float | None) -> str:
    if value is None:
        return NOTHING
    if value >= 10_000:
        return f"{value / 1000:.1f} s"
    return f"{value:.1f} ms" if value < 10 else f"{value:,.0f} ms"


def pct(value: float | None) -> str:
    return NOTHING if value is None else f"{value * 100:.1f} %"


def signed_change(value: float | None) -> str:
    """+12 % / −5 % (a real minus sign); empty when there is nothing to compare with."""
    if value is None:
        return ""
    percent = value * 100
    text = f"{abs(percent):.1f}" if abs(percent) < 10 else f"{abs(percent):,.0f}"
    return f"{'+' if percent >= 0 else '−'}{text} %"


def status_class(status: int | None) -> str:
    """The colour a status gets: ok (2xx), warn (4xx), bad (5xx or none)."""
    if status is not None and status < 400:
        return "ok"
    return "warn" if status is not None and status < 500 else "bad"


def alert_value(value: float | None, unit: str) -> str:
    """An alert rule's value or threshold in its unit, as the notifications write it."""
    return NOTHING if value is None else format_value(value, unit)


FILTERS = {"usd": usd, "count": count, "ms": ms, "pct": pct, "change": signed_change, "status_class": status_class,
           "alert_value": alert_value}
