"""What the store keeps: one row per request, the rate-limit buckets, the monthly counters, cache writes.

Plain data shared by every backend; the column list of the `requests` table is derived from RequestRecord.
"""

from __future__ import annotations

import dataclasses
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
    flow_id: str | None = dataclasses.field(default=None, compare=False)  # for mitmweb, not stored


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

COLUMNS = [f.name for f in dataclasses.fields(RequestRecord) if f.name != "flow_id"]
