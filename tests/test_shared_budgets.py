"""The budget scripts against a real redis-server: exact reservations, settlements that count once, a lost hash."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from metrion_addon.budgets import Reservation
from metrion_addon.config import Shared
from metrion_addon.shared_budgets import SharedBudgetCounters, budget_key
from metrion_addon.shared_limits import SharedLimits
from metrion_addon.store import BudgetState

MONTH = "2026-11"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop per test: the async client's connections belong to it."""
    running = asyncio.new_event_loop()
    yield running
    running.close()


def counters(url: str, saved: tuple[BudgetState, ...] = ()) -> SharedBudgetCounters:
    shared = SharedLimits(Shared(redis=url), 100, {"team": None}, "fingerprint", [])
    shared.connect(0.0)
    return SharedBudgetCounters(shared, url, saved)


def reserve(loop: asyncio.AbstractEventLoop, budget: SharedBudgetCounters, amount: int, limit: int = 1000
            ) -> tuple[Reservation, bool, BudgetState]:
    reservation = budget.new_reservation("team", MONTH, amount)
    reserved, state = loop.run_until_complete(budget.reserve(reservation, limit))
    return reservation, reserved, state


def test_reservations_stop_at_the_limit_and_settle_once(start_redis, loop) -> None:
    server = start_redis()
    budget = counters(server.url)
    first, ok, state = reserve(loop, budget, 600)
    assert ok and (state.spent_nanousd, state.reserved_nanousd) == (0, 600)
    _, ok, state = reserve(loop, budget, 401)
    assert not ok and state.reserved_nanousd == 600  # 600 + 401 > 1000: refused, nothing held
    settled = budget.settle(first, 250)
    assert settled is not None and (settled.spent_nanousd, settled.reserved_nanousd) == (250, 0)
    again = budget.settle(first, 250)  # a retried settlement (say, after a timeout) changes nothing
    assert again is not None and (again.spent_nanousd, again.reserved_nanousd) == (250, 0)
    assert budget.settle(first, None) is None  # None keeps a reservation: no round trip
    _, ok, state = reserve(loop, budget, 750)
    assert ok and state.spent_nanousd + state.reserved_nanousd == 1000  # exactly up to the limit


@pytest.mark.parametrize("saved_only", [False, True], ids=["seen-running", "saved-in-database"])
def test_a_budget_lost_with_redis_data_restarts_from_what_an_instance_saw(start_redis, loop, saved_only: bool) -> None:
    server = start_redis()
    budget = counters(server.url)
    held, _, _ = reserve(loop, budget, 300)
    assert budget.settle(held, 200) is not None
    _, _, seen = reserve(loop, budget, 100)
    assert (seen.spent_nanousd, seen.reserved_nanousd) == (200, 100)
    if saved_only:  # a new process that only has the snapshot its database kept
        budget = counters(server.url, (seen,))
    redis.Redis.from_url(server.url).delete(budget_key("team", MONTH))  # as after a restart without persistence
    _, ok, state = reserve(loop, budget, 701)
    assert not ok and state.spent_nanousd == 300  # 200 spent + 100 in flight count as spent: 701 would overshoot
    _, ok, state = reserve(loop, budget, 700)
    assert ok and (state.spent_nanousd, state.reserved_nanousd) == (300, 700)
    after = budget.settle(held, 200)  # a reservation from before the loss is not there: nothing changes
    assert after is not None and (after.spent_nanousd, after.reserved_nanousd) == (300, 700)
