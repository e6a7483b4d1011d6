"""The token bucket and the monthly cap, driven by an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from metrion_addon.errors import MetrionError
from metrion_addon.limits import Limits, MonthlyQuota, RateLimiter, month_of, next_month_start
from metrion_addon.store import BucketState, MonthlyCount


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_bucket_allows_a_full_burst_then_refills_continuously() -> None:
    limiter = RateLimiter(100)
    now = 1000.0
    assert all(limiter.take("a", now).allowed for _ in range(100))
    refused = limiter.take("a", now)
    assert not refused.allowed and refused.retry_after == pytest.approx(0.6)
    assert refused.reset_seconds == pytest.approx(60)
    assert limiter.take("a", now + 0.6).allowed
    assert not limiter.take("a", now + 0.6).allowed
    assert limiter.take("b", now).allowed  # buckets are per token


def test_bucket_state_restores_without_a_fresh_burst() -> None:
    limiter = RateLimiter(60)
    for _ in range(60):
        limiter.take("a", 0.0)
    saved = limiter.state("a")
    assert saved == BucketState("a", 0.0, 0.0)
    restored = RateLimiter(60, [saved])
    assert not restored.take("a", 0.5).allowed
    assert restored.take("a", 1.0).allowed  # one token a second came back meanwhile


def test_lowered_rate_limit_caps_a_saved_bucket() -> None:
    assert RateLimiter(10, [BucketState("a", 50.0, 0.0)]).take("a", 0.0).remaining == 9


def test_monthly_cap_counts_to_n_then_refuses() -> None:
    quota = MonthlyQuota()
    now = at("2026-11-15T10:00:00")
    for n in range(1, 4):
        assert quota.check("a", 3, now).allowed
        decision, count = quota.count("a", 3, now)
        assert decision.remaining == 3 - n and count == MonthlyCount("a", "2026-11", n)
    refused = quota.check("a", 3, now)
    assert not refused.allowed and refused.remaining == 0
    assert refused.resets_at == at("2026-12-01T00:00:00")
    assert quota.check("a", None, now).allowed  # no cap


def test_monthly_cap_resets_on_first_of_month_utc() -> None:
    quota = MonthlyQuota([MonthlyCount("a", "2026-12", 5)])
    assert not quota.check("a", 5, at("2026-12-31T23:59:59")).allowed
    assert quota.check("a", 5, at("2027-01-01T00:00:00")).allowed


@pytest.mark.parametrize(
    ("now", "month", "next_start"),
    [
        ("2026-11-30T23:59:59", "2026-11", "2026-12-01T00:00:00"),
        ("2026-12-01T00:00:00", "2026-12", "2027-01-01T00:00:00"),
        ("2028-02-29T12:00:00", "2028-02", "2028-03-01T00:00:00"),
    ],
)
def test_months_are_calendar_months_in_utc(now: str, month: str, next_start: str) -> None:
    assert month_of(at(now)) == month
    assert next_month_start(at(now)) == at(next_start)


def test_admission_refuses_with_the_headers_sdks_need() -> None:
    limits = Limits(2, {"free": 3, "pro": None})
    now = at("2026-11-30T23:59:00")
    first = limits.admit("a", "free", now)
    assert first.headers == {"x-metrion-ratelimit-limit": "2", "x-metrion-ratelimit-remaining": "1",
                             "x-metrion-ratelimit-reset": "30", "x-metrion-quota-limit": "3",
                             "x-metrion-quota-remaining": "2"}
    assert first.saved == (BucketState("a", 1.0, now), MonthlyCount("a", "2026-11", 1))
    limits.admit("a", "free", now)
    with pytest.raises(MetrionError) as rate:
        limits.admit("a", "free", now)
    assert (rate.value.status, rate.value.code) == (429, "rate_limit_exceeded")
    assert rate.value.headers["retry-after"] == "30" and rate.value.headers["retry-after-ms"] == "30000"
    limits.admit("a", "free", now + 30)
    with pytest.raises(MetrionError) as cap:
        limits.admit("a", "free", now + 45)  # the cap is checked before the bucket
    assert cap.value.code == "monthly_quota_exceeded" and cap.value.headers["x-should-retry"] == "false"
    assert cap.value.headers["retry-after"] == "15"  # until the month ends
    assert limits.admit("a", "free", now + 60).headers["x-metrion-quota-remaining"] == "2"  # December
    assert "x-metrion-quota-limit" not in limits.admit("b", "pro", now).headers
