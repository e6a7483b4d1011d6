"""The `metrion` command: reports, logs and quotas read from the request database, and new tokens.

Each subcommand is a thin shell over one report.py function; any problem is one `metrion: ...` line, exit 2.
"""

from __future__ import annotations

import csv
import io
import json
import secrets
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import yaml
from tabulate import tabulate

from metrion_addon import alerts as alert_rules
from metrion_addon import notify, store
from metrion_addon import report as queries
from metrion_addon.clock import clock_from_env
from metrion_addon.config import (
    DEFAULT_CONFIG_FILES,
    Config,
    ConfigError,
    find_config,
    hash_token,
    load_config,
)
from metrion_addon.pricing import base_model
from metrion_addon.store import cache as cache_store

FORMATS = ("table", "json", "csv")
WIDTH = 100  # table output fits a terminal this wide: long names are cut to share what is left


class Problem(click.ClickException):
    """A problem the user can fix, shown as one line on stderr with exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"metrion: {self.format_message()}", err=True)


class _Metrion(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # click would print the usage too: one line is clearer
            raise Problem(e.format_message()) from e


@dataclass(frozen=True)
class Column:
    """How a table shows one field of a row; a `name` column is cut short if the table is too wide."""

    header: str
    key: str
    show: Callable[[Any], str] = str
    right: bool = True
    name: bool = False


def _count(value: int) -> str:
    for threshold, unit, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if value >= threshold:
            return f"{value / unit:.1f}{suffix}"
    return str(value)


def _cost(value: float | None) -> str:
    """Dollars and cents from $1 up; below, three significant digits, so $0.000009 does not read as $0.0000."""
    if value is None:
        return "-"
    if value >= 1 or value == 0:
        return f"${value:,.2f}"
    digits = f"{Decimal(f'{value:.3g}'):f}"
    return f"${digits}{'0' * (4 - len(digits))}"  # at least two decimals: $0.50, not $0.5


def _size(value: int) -> str:
    for threshold, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= threshold:
            return f"{value / threshold:.1f} {unit}"
    return f"{value} B"


def _dollars(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else str(round(value))


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _table(rows: list[dict[str, Any]], columns: list[Column], note: str | None = None) -> str:
    """Aligned columns within WIDTH; a row's `note` field, when set, goes on an indented line of its own below it."""
    cells = [[column.show(row[column.key]) for column in columns] for row in rows]
    widths = [max(len(column.header), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    names = sorted((i for i, column in enumerate(columns) if column.name), key=lambda i: widths[i])
    room = WIDTH - sum(width for i, width in enumerate(widths) if i not in names) - 2 * (len(columns) - 1)
    for left, i in enumerate(names):  # narrowest first, so what a short name leaves over goes to the longer ones
        widths[i] = min(widths[i], max(8, room // (len(names) - left)))
        room -= widths[i]
    for line in cells:
        for i in names:
            line[i] = _cut(line[i], widths[i])
    headers = [column.header for column in columns]
    align = ["right" if column.right else "left" for column in columns]
    lines = tabulate([headers, *cells], tablefmt="plain", disable_numparse=True, colalign=align).splitlines()
    if note is None:
        return "\n".join(lines)
    out = lines[:1]
    for row, line in zip(rows, lines[1:], strict=True):
        out.append(line)
        if text := row.get(note):
            out.append(_cut(f"  ↳ {' '.join(str(text).split())}", WIDTH))
    return "\n".join(out)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _tidy(value: Any) -> Any:
    """A float without the noise of binary sums (0.0009750000000000001 is 0.000975): 12 significant digits."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def _emit(
    rows: list[dict[str, Any]],
    fields: list[str],
    fmt: str,
    columns: list[Column],
    *,
    total: dict[str, Any] | None = None,
    note: str | None = None,
) -> None:
    """Rows as JSON, CSV or a table; the table alone gets the `total` row and the rows' `note` lines."""
    if fmt != "table":
        rows = [{key: _tidy(value) for key, value in row.items()} for row in rows]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
    elif not rows:
        click.echo("(no rows)")
    else:
        click.echo(_table(rows if total is None else [*rows, total], columns, note))


def _load(config_path: str | None) -> Config:
    try:
        return load_config(find_config(config_path), need_keys=False)
    except ConfigError as e:
        raise Problem(str(e)) from e


def _open(config: Config, table: str = "requests") -> Any:
    """The database read-only (SQLite or PostgreSQL), so that the CLI never creates or changes it."""
    path = config.database
    if isinstance(path, Path) and not path.is_file():
        raise Problem(f"no database at {path} (start the proxy first, or set database: in {config.path})")
    shown = store.shown(path)
    try:
        conn = store.read_only(path, ())
        found = store.has_table(conn, table)
        empty = table == "requests" and found and not conn.execute("SELECT 1 FROM requests LIMIT 1").fetchone()
    except store.Unavailable as e:
        raise Problem(str(e)) from e
    except store.Error as e:
        raise Problem(f"{shown}: cannot read the database: {str(e).strip()}") from e
    if not found:
        raise Problem(f"{shown}: no {table} table: not a Metrion database, or the proxy has not started yet")
    if empty:
        raise Problem(f"{shown}: no requests recorded yet")
    return conn


def _time(text: str | None, now: datetime) -> str | None:
    try:
        return None if text is None else queries.parse_since(text, now)
    except ValueError as e:
        raise Problem(str(e)) from e


def _options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help="Output format."
    )(command)
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        help="Config file; the default is ./config.yaml, then ./config.example.yaml.",
    )(command)


@click.group(cls=_Metrion)
@click.version_option(package_name="metrion", prog_name="metrion", message="%(prog)s %(version)s")
def main() -> None:
    """Metrion: reports, logs and quotas from the AI usage meter's database."""


@main.command()
@_options
@click.option("--since", help="Start: 7d, 24h, 30m ago, a UTC date (2026-11-01) or an ISO time. Default: all.")
@click.option("--until", help="End (exclusive), in the same forms as --since. Default: now.")
@click.option("--by", "by", multiple=True, type=click.Choice(list(queries.GROUPS)), help="Group by; repeatable.")
def report(config_path: str | None, fmt: str, since: str | None, until: str | None, by: tuple[str, ...]) -> None:
    """Requests, errors, tokens, cost and latency (p50, p95) per group."""
    config = _load(config_path)
    now = datetime.now(UTC)
    start, end = _time(since, now), _time(until, now)
    conn = _open(config)
    rows = queries.report(conn, start, end, list(by))
    names = list(dict.fromkeys(by))
    total = None
    if names and rows and fmt == "table":
        [overall] = queries.report(conn, start, end, [])
        total = {**dict.fromkeys(names, ""), names[0]: "total", **overall}
    columns = [Column(name, name, _text, right=name == "status", name=name not in ("day", "status")) for name in names]
    columns += [
        Column("req", "requests"),
        Column("err", "errors"),
        Column("err%", "error_rate", lambda rate: f"{rate:.1%}"),
        Column("in", "input_tokens", _count),
        Column("out", "output_tokens", _count),
        Column("cached", "cached_tokens", _count),
        Column("cost", "cost_usd", _cost),
        Column("p50 ms", "latency_p50_ms", _ms),
        Column("p95 ms", "latency_p95_ms", _ms),
    ]
    _emit(rows, [*names, *queries.REPORT_COLUMNS], fmt, columns, total=total)


@main.command()
@_options
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="How many rows.")
@click.option("--since", help="Start: 7d, 24h, 30m ago, a UTC date (2026-11-01) or an ISO time. Default: all.")
@click.option("--until", help="End (exclusive), in the same forms as --since. Default: now.")
@click.option("--token", help="Only this token's rows.")
@click.option("--provider", help="Only this provider (anthropic, openai, gemini, mistral, grok or a configured one).")
@click.option("--model", help="Only this model, as asked for or as answered (gpt-4o also finds gpt-4o-2024-08-06).")
@click.option("--status", help="Only this status: a code (429) or a class (4xx).")
@click.option("--requester", help="Only this requester.")
def logs(
    config_path: str | None,
    fmt: str,
    limit: int,
    since: str | None,
    until: str | None,
    token: str | None,
    provider: str | None,
    model: str | None,
    status: str | None,
    requester: str | None,
) -> None:
    """The latest requests, newest first; in a table, each error on a line below its request."""
    config = _load(config_path)
    now = datetime.now(UTC)
    if provider is not None and provider not in config.providers:
        raise Problem(f"unknown provider {provider!r} (known: {', '.join(config.providers)})")
    try:
        codes = None if status is None else queries.parse_status(status)
    except ValueError as e:
        raise Problem(str(e)) from e
    filters = queries.LogFilter(
        token=token,
        provider=provider,
        model=model,
        status=codes,
        requester=requester,
        since=_time(since, now),
        until=_time(until, now),
    )
    rows = queries.logs(_open(config), limit, filters)
    columns = [
        Column("time", "ts", lambda ts: ts[:19].replace("T", " "), right=False),
        Column("token", "token_name", _text, right=False, name=True),
        Column("requester", "requester", _text, right=False, name=True),
        Column("provider", "provider", _text, right=False),
        Column("model", "model", _text, right=False, name=True),
        Column("st", "status", lambda code: "-" if code is None else str(code)),
        Column("in", "input_tokens", _count),
        Column("out", "output_tokens", _count),
        Column("cost", "cost_usd", _cost),
        Column("ms", "latency_ms", _ms),
    ]
    _emit(rows, queries.LOG_COLUMNS, fmt, columns, note="error")


@main.command()
@_options
@click.argument("name", required=False)
def quota(config_path: str | None, fmt: str, name: str | None) -> None:
    """Each token's plan, requests and dollars this month: cap, budget, spent, reserved, left; the reset date (UTC)."""
    config = _load(config_path)
    now = datetime.now(UTC)
    conn = _open(config, "monthly_usage")
    shared = None
    if config.shared is not None:  # every instance's counts are in Redis; this instance's database has its own
        # Imported here: the Redis client would slow every other subcommand's start.
        import redis

        from metrion_addon.shared_budgets import read_quota

        try:
            shared = read_quota(config.shared.redis, [token.name for token in config.tokens], now.strftime("%Y-%m"))
        except redis.RedisError as e:
            click.echo(f"metrion: Redis unreachable ({type(e).__name__}): showing what {config.database} last "
                       "saw, not every instance's counts", err=True)
    try:
        rows = queries.quota(conn, config, now, name, shared)
    except ValueError as e:
        raise Problem(str(e)) from e
    columns = [
        Column("token", "token", right=False, name=True),
        Column("plan", "plan", right=False, name=True),
        Column("used", "requests"),
        Column("cap", "cap", lambda cap: "unlimited" if cap is None else str(cap)),
        Column("left", "remaining", lambda left: "-" if left is None else str(left)),
        Column("budget", "budget_usd", _dollars),
        Column("spent", "spent_usd", _cost),
        Column("reserved", "reserved_usd", _cost),
        Column("$ left", "remaining_usd", _cost),
        Column("resets", "resets", right=False),
    ]
    _emit(rows, queries.QUOTA_COLUMNS, fmt, columns)


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file; the default is ./config.yaml, then ./config.example.yaml.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8081, show_default=True, help="Port (0: any free).")
@click.option("--hash-password", is_flag=True, help="Ask for a password, print its dashboard password_hash, exit.")
def dashboard(config_path: str | None, host: str, port: int, hash_password: bool) -> None:
    """Serve the web dashboard over the request log (read-only; the proxy runs separately)."""
    # Imported here: the web stack would slow every other subcommand's start.
    from metrion_addon.clock import clock_from_env
    from metrion_addon.dashboard import access, app

    if hash_password:
        click.echo(access.hash_password(click.prompt("Password", hide_input=True, confirmation_prompt=True)))
        return
    config = _load(config_path)
    if refused := access.refuse_open_bind(host, config.dashboard):
        raise Problem(refused)
    try:
        app.serve(config, clock_from_env(), host, port, announce=lambda line: click.echo(line, err=True))
    except OSError as e:
        raise Problem(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


@main.group()
def alerts() -> None:
    """Alert rules: their current state, and test notifications."""


@alerts.command("status")
@_options
def alerts_status(config_path: str | None, fmt: str) -> None:
    """Each rule's current value, threshold, level (ok, warning, alert) and when it last notified."""
    config = _load(config_path)
    rows = alert_rules.status(_open(config, "alert_events"), config, clock_from_env()())
    columns = [
        Column("rule", "rule", right=False, name=True),
        Column("type", "type", right=False),
        Column("value", "value", lambda value: "-" if value is None else f"{value:,.4g}"),
        Column("threshold", "threshold", lambda value: f"{value:,.4g}"),
        Column("unit", "unit", right=False),
        Column("level", "level", right=False),
        Column("last notified", "last_notified", lambda ts: "never" if ts is None else ts[:19].replace("T", " "),
               right=False),
        Column("as", "last_level", _text, right=False),
    ]
    _emit(rows, alert_rules.STATUS_COLUMNS, fmt, columns)


@alerts.command("test")
@_options
@click.argument("rule")
def alerts_test(config_path: str | None, fmt: str, rule: str) -> None:
    """Send a clearly marked test notification for RULE to each of its channels now, and record it."""
    config = _load(config_path)
    chosen = next((r for r in config.alerts.rules if r.name == rule), None)
    if chosen is None:
        known = ", ".join(r.name for r in config.alerts.rules) or "none"
        raise Problem(f"no alert rule named {rule!r} in {config.path} (known: {known})")
    reader = _open(config, "alert_events")
    now = clock_from_env()()
    body = alert_rules.payload(chosen, alert_rules.measure(reader, chosen, now), "test", test=True)
    reader.close()
    rows = []
    writer = store.writable(config.database)  # the one write the CLI makes: its own test notifications
    for name in chosen.notify:
        channel = config.alerts.channels[name]
        event = notify.event_of(name, channel, body, notify.deliver(channel, config.alerts, body), now)
        with writer:
            store.insert_alert_event(writer, event)
        rows.append({"channel": name, "kind": event.kind, "delivered": event.delivered, "attempts": event.attempts,
                     "error": event.error})
    writer.close()
    columns = [Column("channel", "channel", right=False, name=True), Column("kind", "kind", right=False),
               Column("delivered", "delivered", lambda ok: "yes" if ok else "NO"), Column("attempts", "attempts"),
               Column("error", "error", _text, right=False, name=True)]
    _emit(rows, ["channel", "kind", "delivered", "attempts", "error"], fmt, columns)
    if not all(row["delivered"] for row in rows):
        raise Problem(f"{sum(not row['delivered'] for row in rows)} of {len(rows)} channel(s) failed")


@main.group()
def tokens() -> None:
    """Metrion tokens: the sk-metrion- keys that apps send instead of provider keys."""


@tokens.command("new")
@_options
@click.option("--name", required=True, help="What reports and the database call this token.")
@click.option("--plan", default="free", show_default=True, help="Plan from the config's plans:.")
def tokens_new(config_path: str | None, fmt: str, name: str, plan: str) -> None:
    """Print a fresh token once, and the config entry that stores only its hash."""
    if config_path is not None or any(Path(file).is_file() for file in DEFAULT_CONFIG_FILES):
        config = _load(config_path)
        if plan not in config.plans:
            raise Problem(f"unknown plan {plan!r} (known in {config.path}: {', '.join(config.plans)})")
        if any(token.name == name for token in config.tokens):
            raise Problem(f"{config.path} already has a token named {name!r}")
    token = f"sk-metrion-{secrets.token_hex(16)}"
    stored = f"sha256:{hash_token(token)}"
    snippet = yaml.safe_dump([{"name": name, "token": stored, "plan": plan}], sort_keys=False)
    if fmt == "table":
        click.echo(token)
        click.echo("\nShown once: Metrion keeps only its hash. Add this under tokens: in your config:\n")
        click.echo(snippet, nl=False)
    else:
        row = {"name": name, "plan": plan, "token": token, "token_hash": stored, "yaml": snippet}
        _emit([row], list(row), fmt, [])


def _on_redis(read: Callable[[str], Any], url: str) -> Any:
    """`read(url)` against the shared Redis; a Problem saying where if it cannot be reached."""
    import redis  # here: the Redis client would slow every other subcommand's start

    from metrion_addon.shared_limits import redis_address

    try:
        return read(url)
    except redis.RedisError as e:
        raise Problem(f"cannot reach Redis at {redis_address(url)} (shared.redis): {type(e).__name__}") from e


@main.group()
def cache() -> None:
    """The response cache (requests sent with x-metrion-cache): what it holds and saves, and clearing it."""


@cache.command("stats")
@_options
@click.option("--since", help="Hits and savings from: 7d, 24h, 30m ago, a UTC date or an ISO time. Default: all.")
@click.option("--until", help="End (exclusive), in the same forms as --since. Default: now.")
def cache_stats(config_path: str | None, fmt: str, since: str | None, until: str | None) -> None:
    """Entries and bytes stored now; lookups, hits, hit rate and USD saved over the period."""
    config = _load(config_path)
    now = datetime.now(UTC)
    start, end = _time(since, now), _time(until, now)
    row = cache_store.cache_stats(_open(config, "cache_entries"), now.timestamp(), start, end)
    if config.shared is not None:  # entries live in Redis; lookups and hits are this instance's rows
        from metrion_addon.store import redis_cache

        row.update(_on_redis(lambda url: redis_cache.held_on_redis(url, now.timestamp()), config.shared.redis))
    columns = [
        Column("entries", "entries"),
        Column("expired", "expired"),
        Column("size", "bytes", _size),
        Column("lookups", "lookups"),
        Column("hits", "hits"),
        Column("refreshes", "refreshes"),
        Column("hit rate", "hit_rate", lambda rate: "-" if rate is None else f"{rate:.1%}"),
        Column("saved", "saved_usd", _cost),
    ]
    _emit([row], cache_store.STATS_COLUMNS, fmt, columns)


@cache.command("clear")
@_options
@click.option("--token", help="Only this token's entries.")
@click.option("--model", help="Only this model's entries (as the provider returned it, or without its date stamp).")
def cache_clear(config_path: str | None, fmt: str, token: str | None, model: str | None) -> None:
    """Delete cache entries (all of them, or those of a token and/or a model); works while the proxy runs."""
    config = _load(config_path)
    _open(config, "cache_entries").close()
    if config.shared is not None:
        from metrion_addon.store import redis_cache

        removed = _on_redis(lambda url: redis_cache.clear_on_redis(url, token, model, base_model), config.shared.redis)
    else:
        with closing(sqlite3.connect(config.database, timeout=10)) as conn:
            removed = cache_store.clear_cache(conn, token, model, base_model)
    if fmt == "table":
        click.echo(f"removed {removed} cache entr{'y' if removed == 1 else 'ies'}")
    else:
        _emit([{"removed": removed}], ["removed"], fmt, [])


if __name__ == "__main__":
    main()
