"""The limits a Metrion token lives under: a token bucket per minute and a request cap per calendar month.

Pure code: the caller passes the time; state is loaded from and saved to the store by the caller.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import MetrionError
from .store import BucketState, MonthlyCount


@dataclass
class TokenBucket:
    capacity: float
    rate: float  # tokens added per second
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def seconds_until(self, tokens: float) -> float:
        return max(0.0, (tokens - self.tokens) / self.rate)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float  # until the bucket is full again
    retry_after: float  # until the next request would pass (0 if this one did)


class RateLimiter:
    """`per_minute` requests a minute per token name, bursting up to `per_minute`."""

    def __init__(self, per_minute: int, saved: Iterable[BucketState] = ()) -> None:
        self.per_minute = per_minute
        self._buckets = {s.token_name: self._bucket(min(s.tokens, per_minute), s.updated_at) for s in saved}

    def _bucket(self, tokens: float, now: float) -> TokenBucket:
        return TokenBucket(self.per_minute, self.per_minute / 60, tokens, now)

    def resize(self, per_minute: int) -> None:
        """A new rate for every bucket, keeping what each holds (up to the new capacity)."""
        self.per_minute = per_minute
        for bucket in self._buckets.values():
            bucket.capacity, bucket.rate = per_minute, per_minute / 60
            bucket.tokens = min(bucket.tokens, per_minute)

    def take(self, name: str, now: float) -> RateDecision:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = self._bucket(self.per_minute, now)
        allowed = bucket.take(now)
        return RateDecision(
            allowed=allowed,
            limit=self.per_minute,
            remaining=math.floor(bucket.tokens),
            reset_seconds=bucket.seconds_until(bucket.capacity),
            retry_after=0.0 if allowed else bucket.seconds_until(1),
        )

    def state(self, name: str) -> BucketState:
        bucket = self._buckets[name]
        return BucketState(name, bucket.tokens, bucket.updated)


def month_of(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


def next_month_start(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


class CalendarMonth:
    """The month `now` falls in, recomputed only when `now` leaves it (date formatting is slow on a hot path)."""

    def __init__(self) -> None:
        self._start = self._end = 0.0
        self._key = ""

    def __call__(self, now: float) -> tuple[str, float]:
        """(`YYYY-MM`, start of next month) for `now`."""
        if not self._start <= now < self._end:
            self._key, self._end = month_of(now), next_month_start(now)
            self._start = datetime.strptime(self._key, "%Y-%m").replace(tzinfo=UTC).timestamp()
        return self._key, self._end


@dataclass(frozen=True)
class QuotaDecision:
    allowed: bool
    limit: int | None
    used: int  # requests counted this month, this one included if allowed
    resets_at: float

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


class MonthlyQuota:
    """Requests forwarded per token name per calendar month (UTC); a cap of None means unlimited."""

    def __init__(self, saved: Iterable[MonthlyCount] = ()) -> None:
        self._counts = {(s.token_name, s.month): s.requests for s in saved}
        self._month = CalendarMonth()

    def check(self, name: str, cap: int | None, now: float) -> QuotaDecision:
        month, resets_at = self._month(now)
        used = self._counts.get((name, month), 0)
        return QuotaDecision(cap is None or used < cap, cap, used, resets_at)

    def count(self, name: str, cap: int | None, now: float) -> tuple[QuotaDecision, MonthlyCount]:
        """Count one forwarded request; the caller has checked that it is allowed."""
        month, resets_at = self._month(now)
        used = self._counts[(name, month)] = self._counts.get((name, month), 0) + 1
        return QuotaDecision(True, cap, used, resets_at), MonthlyCount(name, month, used)


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


@dataclass(frozen=True)
class Admission:
    headers: dict[str, str]  # x-metrion-ratelimit-* and x-metrion-quota-*, for the forwarded response
    saved: tuple[BucketState | MonthlyCount, ...]  # the new limit state, for the store


class Limits:
    """Both limits together, in the order that keeps them exact: cap checked, then bucket, then cap counted."""

    def __init__(self, per_minute: int, caps: Mapping[str, int | None], buckets: Iterable[BucketState] = (),
                 months: Iterable[MonthlyCount] = ()) -> None:
        self.rates = RateLimiter(per_minute, buckets)
        self.quota = MonthlyQuota(months)
        self._caps = caps

    def reconfigure(self, per_minute: int, caps: Mapping[str, int | None]) -> None:
        """New limits from a reloaded config; the counts so far stay."""
        self.rates.resize(per_minute)
        self._caps = caps

    def admit(self, name: str, plan: str, now: float) -> Admission:
        """Count one request of token `name`; raise MetrionError(429) if a limit refuses it."""
        cap = self._caps[plan]
        quota = self.quota.check(name, cap, now)
        if not quota.allowed:
            return decide(name, plan, quota, None, now, ())
        rate = self.rates.take(name, now)
        if not rate.allowed:
            return decide(name, plan, quota, rate, now, ())
        counted, month = self.quota.count(name, cap, now)
        return decide(name, plan, counted, rate, now, (self.rates.state(name), month))

    def admit_cached(self, name: str, plan: str, now: float) -> Admission:
        """A request answered from the response cache: it takes from the rate bucket (a runaway loop is still
        throttled) but not from the monthly cap, which counts requests that reached a provider."""
        quota = dataclasses.replace(self.quota.check(name, self._caps[plan], now), allowed=True)
        rate = self.rates.take(name, now)
        return decide(name, plan, quota, rate, now, (self.rates.state(name),) if rate.allowed else ())


def decide(name: str, plan: str, quota: QuotaDecision, rate: RateDecision | None, now: float,
           saved: tuple[BucketState | MonthlyCount, ...]) -> Admission:
    """The admission for these decisions (wherever they were taken), or MetrionError(429) saying which limit refused.

    `rate` is None when the monthly cap refused the request before the bucket was asked.
    """
    cap = quota.limit
    if not quota.allowed:
        wait = _whole_seconds(quota.resets_at - now)
        raise MetrionError(429, "monthly_quota_exceeded", (
            f"Monthly request cap reached: {cap} requests for plan '{plan}' of Metrion token '{name}'. "
            f"The cap resets at the start of next month (UTC), in {wait} s."
        ), {"retry-after": str(wait), "x-should-retry": "false", **quota_headers(cap, 0)})
    assert rate is not None
    headers = {
        "x-metrion-ratelimit-limit": str(rate.limit),
        "x-metrion-ratelimit-remaining": str(rate.remaining),
        "x-metrion-ratelimit-reset": str(math.ceil(rate.reset_seconds)),
    }
    if not rate.allowed:
        retry_ms = max(1, math.ceil(rate.retry_after * 1000))
        raise MetrionError(429, "rate_limit_exceeded", (
            f"Rate limit reached: {rate.limit} requests per minute for Metrion token '{name}'. "
            f"Retry in {retry_ms / 1000:.3f} s."
        ), {"retry-after": str(_whole_seconds(rate.retry_after)), "retry-after-ms": str(retry_ms), **headers})
    return Admission({**headers, **quota_headers(cap, quota.remaining)}, saved)


def quota_headers(cap: int | None, remaining: int | None) -> dict[str, str]:
    if cap is None:
        return {}
    return {"x-metrion-quota-limit": str(cap), "x-metrion-quota-remaining": str(remaining)}
