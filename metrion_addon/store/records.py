"""What the store keeps: one row per request, the rate-limit buckets, the monthly counters, cache writes.

Plain data shared by every backend, and `storable`: the boundary that makes any row's values writable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass


@dataclass
class RequestRecord:
    """One row of the `requests` table; cost_usd and price_source are filled in by the writer."""

    ts: str
    token_name: str | None
    requester: str | None
    provider: str
    model: str | None
    path: str
    method: str
    stream: bool
    status: int | None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    latency_ms: float | None = None
    ttfb_ms: float | None = None
    usage_source: str = "none"
    error: str | None = None
    auth_mode: str | None = None
    cost_usd: float | None = None
    price_source: str | None = None
    cached: bool = False  # answered from Metrion's response cache
    saved_usd: float | None = None  # on a cache hit: what the original request cost
    cache_status: str | None = None  # HIT, MISS or REFRESH when the request asked for the cache
    requested_model: str | None = None  # the model the client asked for; `model` is what the provider answered
    # Globally unique (UUIDv7), given by the writer when it takes the row: a batch written twice (a retry, a replayed
    # spool) stores each row once. NULL in rows from before it existed.
    uid: str | None = dataclasses.field(default=None, compare=False)
    flow_id: str | None = dataclasses.field(default=None, compare=False)  # for mitmweb, not stored
    # Not stored: the request went (or may have gone) to the provider. Such rows are never dropped.
    forwarded: bool = dataclasses.field(default=True, compare=False)


@dataclass(frozen=True)
class BucketState:
    token_name: str
    tokens: float
    updated_at: float


@dataclass(frozen=True)
class MonthlyCount:
    token_name: str
    month: str
    requests: int


@dataclass(frozen=True)
class BudgetState:
    """A token's dollar budget this month in nano-USD; `version` orders snapshots taken on different threads."""

    token_name: str
    month: str
    spent_nanousd: int
    reserved_nanousd: int
    version: int


@dataclass(frozen=True)
class AlertEvent:
    """One alert notification to one channel, delivered or not: a row of `alert_events`."""

    ts: str
    rule: str
    level: str  # "warning" | "alert"
    channel: str
    kind: str  # "webhook" | "email"
    value: float | None
    threshold: float
    unit: str
    period_start: str
    period_end: str
    delivered: bool
    attempts: int
    error: str | None
    test: bool


@dataclass(frozen=True)
class CacheEntry:
    """One stored reply: what the client received, and what the original request cost (`cost_usd`)."""

    key: str
    token_name: str
    provider: str
    model: str | None
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stream: bool
    created_at: float
    expires_at: float
    cost_usd: float | None = None

    @property
    def size(self) -> int:
        """Bytes counted against `cache.max_mb`: the body and the headers."""
        return len(self.body) + sum(len(name) + len(value) for name, value in self.headers)


@dataclass(frozen=True)
class CacheWrite:
    """Store `entry` in the response cache; its cost is `origin`'s, read when written (the writer prices first)."""

    entry: CacheEntry
    origin: RequestRecord
    max_bytes: int  # the size bound in force: least recently used entries are evicted until the cache fits


@dataclass(frozen=True)
class CacheTouch:
    """A cache entry was used at `used_at`: it moves to the young end of the LRU order."""

    key: str
    used_at: float


# Everything but rows the writer stores; in one batch only the latest of each kind and key is written (alert
# events each have a key of their own).
Counter = BucketState | MonthlyCount | BudgetState | AlertEvent | CacheWrite | CacheTouch


@dataclass(frozen=True)
class DeadLetter:
    """A row the database refused even after `storable`: kept as ASCII JSON with the reason, never dropped."""

    ts: str
    error: str
    row: str

    @classmethod
    def of(cls, record: RequestRecord, error: BaseException) -> DeadLetter:
        fields = {name: getattr(record, name) for name in COLUMNS}
        reason = _text(f"{type(error).__name__}: {error}")
        return cls(_text(record.ts), reason, json.dumps(fields, ensure_ascii=True, default=_text))

def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits; ordered by time, unique anywhere.

    The bits come from `random` (seeded from the OS, reseeded in a forked child): uniqueness needs no secrecy, and
    this takes 8 µs a row where os.urandom and uuid.UUID took 20, on the writer thread that shares the GIL with the
    event loop.
    """
    value = time.time_ns() // 1_000_000 << 80 | 0x7 << 76 | _bits(12) << 64 | 0b10 << 62 | _bits(62)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_bits = random.getrandbits


COLUMNS = [f.name for f in dataclasses.fields(RequestRecord) if f.name not in ("flow_id", "forwarded")]
REQUIRED = ("ts", "provider", "path", "method", "stream", "usage_source")  # NOT NULL columns of `requests`
_KINDS = {f.name: str(f.type) for f in dataclasses.fields(RequestRecord) if f.name in COLUMNS}
_TEXT = tuple(name for name, kind in _KINDS.items() if kind.startswith("str"))
_INTEGER = tuple(name for name, kind in _KINDS.items() if kind.startswith("int"))
_REAL = tuple(name for name, kind in _KINDS.items() if kind.startswith("float"))
_INT64 = range(-(2**63), 2**63)


def storable(record: RequestRecord) -> RequestRecord:
    """The record with every value one a database can take; the same record when it already was.

    Text that cannot be encoded (lone surrogates: bad bytes in headers or paths, `\\ud800` in JSON) keeps
    its readable part, each bad character becoming U+FFFD. A number a column cannot hold becomes NULL, and
    the row's `error` says so. Values of the wrong type are stored as their text.
    """
    changes: dict[str, object] = {}
    notes: list[str] = []
    for name in _TEXT:
        value = getattr(record, name)
        if value is not None and not (type(value) is str and (value.isascii() or _encodable(value))):
            changes[name] = _text(value)
    for name in _INTEGER:
        value = getattr(record, name)
        if value is None or (type(value) is int and value in _INT64):
            continue
        number = _number(value, int)
        if number is None or number not in _INT64:
            notes.append(f"{name} not storable (not a 64-bit integer), stored as NULL")
            number = None
        changes[name] = number
    for name in _REAL:
        value = getattr(record, name)
        if value is None or (type(value) is float and math.isfinite(value)):
            continue
        number = _number(value, float)
        if number is None or not math.isfinite(number):
            notes.append(f"{name} not storable (not a finite number), stored as NULL")
            number = None
        changes[name] = number
    if type(record.stream) is not bool:
        changes["stream"] = bool(record.stream) if isinstance(record.stream, int | float) else True
    if notes:
        error = changes.get("error", record.error)
        changes["error"] = "; ".join([*notes, error] if error else notes)
    return dataclasses.replace(record, **changes) if changes else record


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    try:
        text = str(value) if isinstance(value, str) else repr(value)
    except Exception:  # e.g. an int too long to print
        text = f"<{type(value).__name__} not printable>"
    # Through UTF-16 with surrogatepass: a valid surrogate pair becomes its character, a lone one U+FFFD.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _number(value: object, kind: type[int] | type[float]) -> int | float | None:
    try:
        return kind(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
