"""The budget scripts against a real redis-server: exact reservations, settlements that count once, a lost hash."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from metrion_addon.budgets import Reservation
from metrion_addon.config import Shared
from metrion_addon.shared_budgets import SharedBudgetCounters, budget_key
from metrion_addon.shared_limits import SharedLimits
from metrion_addon.store import BudgetState

MONTH = "2026-11"
NOW = 1_794_312_000.0  # 2026-11-10T12:00:00Z


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop per test: the async client's connections belong to it."""
    running = asyncio.new_event_loop()
    yield running
    running.close()


@dataclass
class OnRedis:
    limits: SharedLimits
    budget: SharedBudgetCounters


def counters(url: str, saved: tuple[BudgetState, ...] = (), per_minute: int = 100) -> OnRedis:
    shared = SharedLimits(Shared(redis=url), per_minute, {"team": None}, "fingerprint", [])
    shared.connect(0.0)
    return OnRedis(shared, SharedBudgetCounters(shared, url, saved))


def reserve(loop: asyncio.AbstractEventLoop, on: OnRedis, amount: int, limit: int = 1000
            ) -> tuple[Reservation, bool, BudgetState]:
    """Admit one request of 'team' (at a fixed time) with a reservation of `amount`; (it, reserved?, the state)."""
    reservation = Reservation("team", MONTH, amount, uuid.uuid4().hex)
    admission = on.limits.admission("team", "team", NOW)
    limits, state = loop.run_until_complete(on.budget.admit_and_reserve(reservation, limit, admission))
    return reservation, limits[-1] == 1, state


def test_reservations_stop_at_the_limit_and_settle_once(start_redis, loop) -> None:
    server = start_redis()
    on = counters(server.url)
    first, ok, state = reserve(loop, on, 600)
    assert ok and (state.spent_nanousd, state.reserved_nanousd) == (0, 600)
    _, ok, state = reserve(loop, on, 401)
    assert not ok and state.reserved_nanousd == 600  # 600 + 401 > 1000: refused, nothing held
    settled = on.budget.settle(first, 250)
    assert settled is not None and (settled.spent_nanousd, settled.reserved_nanousd) == (250, 0)
    again = on.budget.settle(first, 250)  # a retried settlement (say, after a timeout) changes nothing
    assert again is not None and (again.spent_nanousd, again.reserved_nanousd) == (250, 0)
    assert on.budget.settle(first, None) is None  # None keeps a reservation: no round trip
    _, ok, state = reserve(loop, on, 750)
    assert ok and state.spent_nanousd + state.reserved_nanousd == 1000  # exactly up to the limit


@pytest.mark.parametrize("saved_only", [False, True], ids=["seen-running", "saved-in-database"])
def test_a_budget_lost_with_redis_data_restarts_from_what_an_instance_saw(start_redis, loop, saved_only: bool) -> None:
    server = start_redis()
    on = counters(server.url)
    held, _, _ = reserve(loop, on, 300)
    assert on.budget.settle(held, 200) is not None
    _, _, seen = reserve(loop, on, 100)
    assert (seen.spent_nanousd, seen.reserved_nanousd) == (200, 100)
    if saved_only:  # a new process that only has the snapshot its database kept
        on = counters(server.url, (seen,))
    redis.Redis.from_url(server.url).delete(budget_key("team", MONTH))  # as after a restart without persistence
    _, ok, state = reserve(loop, on, 701)
    assert not ok and state.spent_nanousd == 300  # 200 spent + 100 in flight count as spent: 701 would overshoot
    _, ok, state = reserve(loop, on, 700)
    assert ok and (state.spent_nanousd, state.reserved_nanousd) == (300, 700)
    after = on.budget.settle(held, 200)  # a reservation from before the loss is not there: nothing changes
    assert after is not None and (after.spent_nanousd, after.reserved_nanousd) == (300, 700)


def test_one_script_takes_all_or_nothing_from_the_limits_and_the_budget(start_redis, loop) -> None:
    server = start_redis()
    on = counters(server.url, per_minute=2)
    client = redis.Redis.from_url(server.url)
    _, ok, _ = reserve(loop, on, 2000)  # over budget: refused before the limits, the bucket untouched
    assert not ok and client.hget("metrion:rate:team", "tokens") is None
    assert reserve(loop, on, 100)[1] and reserve(loop, on, 100)[1]  # two a minute
    _, ok, state = reserve(loop, on, 100)  # the bucket refuses: nothing reserved, nothing to give back
    assert not ok and state.reserved_nanousd == 200
    assert int(client.get(f"metrion:month:team:{MONTH}")) == 2


def test_instances_hand_back_what_they_saw_before_admissions_resume(start_redis, loop) -> None:
    server = start_redis()
    first, second = counters(server.url), counters(server.url)
    reserve(loop, first, 300)
    reserve(loop, second, 100)  # the second saw 400 in all
    assert reserve(loop, first, 200)[2].reserved_nanousd == 600  # the first saw 600: the latest view
    redis.Redis.from_url(server.url).delete(budget_key("team", MONTH))  # Redis restarted without persistence
    for hand_back in first.limits.recovery:  # what the heartbeat runs when Redis answers again
        loop.run_until_complete(hand_back())
    _, ok, state = reserve(loop, second, 401)  # the second's own view (400) would have let this through
    assert not ok and state.spent_nanousd == 600
