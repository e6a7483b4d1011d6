"""Alert delivery at the edge: webhook POSTs and SMTP emails on one thread per channel, and the monitor thread that
evaluates the rules from the aggregates as rows are written. Nothing here runs on the proxy's event loop.
"""

from __future__ import annotations

import json
import logging
import queue
import smtplib
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path

from metrion_addon.alerts import Measurement, Notified, due, format_value, measure, payload
from metrion_addon.clock import Clock, iso_utc
from metrion_addon.config import AlertChannel, AlertRule, AlertSettings, SMTPSettings
from metrion_addon.store import AlertEvent, read_only

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0
_IDLE_CHECK = 60.0  # with no rows written, still look this often (a cooldown may have passed)
Sleep = Callable[[float], None]


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    attempts: int
    error: str | None


def _attempts(send: Callable[[], None], retries: int, sleep: Sleep) -> Delivery:
    """Call `send` until it succeeds, at most 1 + `retries` times, backing off 0.5 s, 1 s, 2 s ... (at most 5 s)."""
    error = None
    for attempt in range(1, retries + 2):
        try:
            send()
            return Delivery(True, attempt, None)
        except (OSError, smtplib.SMTPException, ValueError) as e:  # URLError, timeouts and refusals are OSErrors
            error = f"{type(e).__name__}: {e}"[:300]
        if attempt <= retries:
            sleep(min(_MAX_BACKOFF, 0.5 * 2 ** (attempt - 1)))
    return Delivery(False, retries + 1, error)


def post_webhook(url: str, body: dict, timeout: float, retries: int, sleep: Sleep = time.sleep) -> Delivery:
    """POST `body` as JSON; any 2xx is delivered, anything else (status, refusal, timeout) is retried."""
    data = json.dumps(body).encode()

    def send() -> None:
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"content-type": "application/json", "user-agent": "metrion-alerts"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()  # non-2xx raises HTTPError

    return _attempts(send, retries, sleep)


def email_message(body: dict, sender: str, to: list[str]) -> EmailMessage:
    """A plain-text email for a notification payload."""
    message = EmailMessage()
    level = "TEST" if body["test"] else body["level"].upper()
    subject = f"[Metrion] {level} {body['rule']}: " \
              f"{format_value(body['value'], body['unit'])} of {format_value(body['threshold'], body['unit'])}"
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = ", ".join(to)
    scope = body["scope"]
    lines = [
        body["text"],
        "",
        f"rule:      {body['rule']} ({body['type']})",
        f"level:     {body['level']}",
        f"value:     {format_value(body['value'], body['unit'])}",
        f"threshold: {format_value(body['threshold'], body['unit'])}",
        f"period:    {body['period']['start']} to {body['period']['end']} ({body['period']['description']})",
        f"providers: {', '.join(scope['providers']) if scope['providers'] else 'all'}",
        f"tokens:    {', '.join(scope['tokens']) if scope['tokens'] else 'all'}",
    ]
    message.set_content("\n".join(lines) + "\n")
    return message


def send_email(smtp: SMTPSettings, to: list[str], body: dict, retries: int, sleep: Sleep = time.sleep) -> Delivery:
    message = email_message(body, smtp.sender, to)

    def send() -> None:
        context = ssl.create_default_context()
        client: smtplib.SMTP = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=context) \
            if smtp.ssl else smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
        with client:
            if smtp.starttls and not smtp.ssl:
                client.starttls(context=context)
            if smtp.user:
                password = smtp.password.get_secret_value() if smtp.password else ""
                client.login(smtp.user, password)
            client.send_message(message)

    return _attempts(send, retries, sleep)


def deliver(channel: AlertChannel, settings: AlertSettings, body: dict, sleep: Sleep = time.sleep) -> Delivery:
    if channel.webhook is not None:
        return post_webhook(channel.webhook, body, settings.webhook_timeout, settings.retries, sleep)
    assert settings.smtp is not None and channel.email is not None  # config validation guarantees both
    return send_email(settings.smtp, channel.email, body, settings.retries, sleep)


def event_of(name: str, channel: AlertChannel, body: dict, delivery: Delivery, now: float) -> AlertEvent:
    return AlertEvent(
        ts=iso_utc(now), rule=body["rule"], level=body["level"], channel=name,
        kind="webhook" if channel.webhook is not None else "email", value=body["value"],
        threshold=body["threshold"], unit=body["unit"], period_start=body["period"]["start"],
        period_end=body["period"]["end"], delivered=delivery.delivered, attempts=delivery.attempts,
        error=delivery.error, test=body["test"],
    )


def log_delivery(event: AlertEvent) -> None:
    """One line per notification, delivered or failed."""
    outcome = "delivered" if event.delivered else f"FAILED after {event.attempts} attempt(s): {event.error}"
    (log.info if event.delivered else log.warning)(
        "metrion: alert %s %s%s -> %s (%s): %s", event.rule, event.level, " (test)" if event.test else "",
        event.channel, event.kind, outcome)


class Courier:
    """One channel's deliveries, in order, on a thread of its own: a slow or dead channel delays nobody else."""

    def __init__(self, name: str, channel: AlertChannel, settings: AlertSettings, record: Callable[[AlertEvent], None],
                 clock: Clock) -> None:
        self.name = name
        self._channel = channel
        self._settings = settings
        self._record = record
        self._clock = clock
        self._queue: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metrion-alerts-{name}", daemon=True)
        self._thread.start()

    def send(self, body: dict) -> None:
        self._queue.put(body)

    def close(self, timeout: float) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (body := self._queue.get()) is not None:
            delivery = deliver(self._channel, self._settings, body, sleep=self._stop.wait)
            event = event_of(self.name, self._channel, body, delivery, self._clock())
            log_delivery(event)
            self._record(event)


def last_notified(rules: Iterable[AlertRule], history: Mapping[tuple[str, str], str]) -> dict[tuple[str, str],
                                                                                            Notified]:
    """When each rule and level last notified, from `alert_events` ({(rule, level): latest ts}), with its period."""
    by_name = {rule.name: rule for rule in rules}
    last = {}
    for (name, level), ts in history.items():
        if (rule := by_name.get(name)) is not None:
            at = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            last[(name, level)] = Notified(at, rule.period.key(at))
    return last


class AlertMonitor:
    """Evaluates every rule off the event loop, when rows have been written and at most every `check_every` s."""

    def __init__(self, settings: AlertSettings, database: Path | str, clock: Clock,
                 record: Callable[[AlertEvent], None], history: Mapping[tuple[str, str], str]) -> None:
        self._settings = settings
        self._database = database
        self._clock = clock
        self._last = last_notified(settings.rules, history)
        self._couriers = {name: Courier(name, channel, settings, record, clock)
                          for name, channel in settings.channels.items()}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrion-alerts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """Rows were written (called on the writer thread): evaluate soon."""
        self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for courier in self._couriers.values():
            courier.close(timeout)

    def _run(self) -> None:
        conn = None
        try:
            while not self._stop.is_set():
                self._wake.wait(_IDLE_CHECK)
                self._wake.clear()
                if self._stop.is_set():
                    return
                started = time.monotonic()
                try:
                    conn = conn or read_only(self._database, ())
                    self.check(conn, self._clock())
                except Exception:  # a bad evaluation must not end alerting: log it and try again next time
                    log.exception("metrion: alert rules could not be evaluated")
                    if conn is not None:  # a database that went away (and came back) needs a new connection
                        conn.close()
                        conn = None
                self._stop.wait(max(0.0, self._settings.check_every - (time.monotonic() - started)))
        finally:
            if conn is not None:
                conn.close()

    def check(self, conn: sqlite3.Connection, now: float) -> list[tuple[str, str]]:
        """Evaluate each rule once; send the levels that are due. Returns (rule, level) for each one sent."""
        sent = []
        for rule in self._settings.rules:
            measured = measure(conn, rule, now)
            key = (rule.name, measured.level or "")
            if not due(measured.level, self._last.get(key), measured.period_key, now,
                       self._settings.cooldown_of(rule)):
                continue
            assert measured.level is not None
            self._last[key] = Notified(now, measured.period_key)
            self.dispatch(rule, measured, measured.level)
            sent.append(key)
        return sent

    def dispatch(self, rule: AlertRule, measured: Measurement, level: str) -> None:
        body = payload(rule, measured, level)
        for channel in rule.notify:
            self._couriers[channel].send(body)
