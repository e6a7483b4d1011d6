"""Dollar budgets shared by every instance on one Redis: reserve and settle in atomic Lua scripts, by reservation id.

Reservations go through the limits' async client on the event loop; settlements run on the writer thread.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Iterable
from datetime import UTC, datetime

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .budgets import Budgets, Hold, Reservation
from .limits import Admission, next_month_start
from .request_body import RequestBody
from .routes import Route
from .shared_limits import PREFIX, SharedLimits, month_key
from .store import BudgetState

log = logging.getLogger(__name__)

_MONTH_KEPT = 40 * 86400  # a month's budget outlives the month by this much (for `metrion quota` afterwards)
_SETTLE_WAIT = 2.0  # seconds the writer thread waits on Redis before it keeps a settlement for later
_UNSETTLED_KEPT = 100_000  # settlements kept for a Redis that is away: past this, reservations stay (the safe side)

# A budget is one hash: spent, reserved, version, life (a random id given when the hash was made), floor (the most
# an instance carried over from a lost hash), and r:<reservation id> -> nano-USD for each reservation held.
RESERVE = """
-- Reserve ARGV[1] nano-USD under reservation id ARGV[3] if spent + reserved + amount <= limit (ARGV[2]).
-- ARGV[4]: the hash's life this instance last saw ('' none); ARGV[5]: spent + reserved as it last saw them (its
-- floor); ARGV[6]: a new life id; ARGV[7]: the version it last saw; ARGV[8]: expiry (unix s).
-- A missing hash that this instance knew (Redis lost its data) starts from the floor; a hash made again by another
-- instance is raised to the highest floor any instance brings, once per instance: nothing known is forgotten.
-- Returns {reserved? 1/0, spent, reserved, version, life}.
local key = KEYS[1]
local life = redis.call('HGET', key, 'life')
if not life then
  life = ARGV[6]
  redis.call('HSET', key, 'life', life, 'spent', ARGV[5], 'reserved', '0', 'floor', ARGV[5], 'version', ARGV[7])
elseif ARGV[4] ~= '' and ARGV[4] ~= life then
  local floor, mine = tonumber(redis.call('HGET', key, 'floor') or '0'), tonumber(ARGV[5])
  if mine > floor then
    redis.call('HINCRBY', key, 'spent', mine - floor)
    redis.call('HSET', key, 'floor', ARGV[5])
  end
end
local amount = tonumber(ARGV[1])
local spent = tonumber(redis.call('HGET', key, 'spent'))
local reserved = tonumber(redis.call('HGET', key, 'reserved'))
local ok = 0
if spent + reserved + amount <= tonumber(ARGV[2]) then
  reserved = redis.call('HINCRBY', key, 'reserved', amount)
  redis.call('HSET', key, 'r:' .. ARGV[3], ARGV[1])
  ok = 1
end
local version = redis.call('HINCRBY', key, 'version', 1)
redis.call('EXPIREAT', key, ARGV[8])
return {ok, string.format('%d', spent), string.format('%d', reserved), version, life}
"""

SETTLE = """
-- Replace reservation ARGV[1] by ARGV[2] nano-USD spent. A reservation the hash does not hold (settled already, or
-- lost with Redis's data) changes nothing, so a settlement retried after a timeout counts once.
-- Returns {settled? 1/0, spent, reserved, version, life} ({0} when the hash is gone).
local key = KEYS[1]
local life = redis.call('HGET', key, 'life')
if not life then return {0} end
local amount = redis.call('HGET', key, 'r:' .. ARGV[1])
local ok = 0
if amount then
  redis.call('HDEL', key, 'r:' .. ARGV[1])
  redis.call('HINCRBY', key, 'reserved', -tonumber(amount))
  redis.call('HINCRBY', key, 'spent', ARGV[2])
  redis.call('HINCRBY', key, 'version', 1)
  ok = 1
end
local state = redis.call('HMGET', key, 'spent', 'reserved', 'version')
return {ok, state[1], state[2], tonumber(state[3]), life}
"""


def budget_key(name: str, month: str) -> str:
    return f"{PREFIX}budget:{name}:{month}"


def _expiry(month: str) -> int:
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC).timestamp()
    return int(next_month_start(start)) + _MONTH_KEPT


def read_quota(url: str, names: Iterable[str], month: str) -> dict[str, tuple[int, int, int]]:
    """{token: (requests, spent, reserved nano-USD)} this month as every instance sees them in Redis.

    Blocking (for the command line); raise redis.RedisError if Redis cannot be reached.
    """
    wanted = list(names)
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))
    try:
        pipe = client.pipeline(transaction=False)
        for name in wanted:
            pipe.get(month_key(name, month))
            pipe.hmget(budget_key(name, month), "spent", "reserved")
        found = pipe.execute()
    finally:
        client.close()
    quota = {}
    for name, requests, (spent, reserved) in zip(wanted, found[::2], found[1::2], strict=True):
        quota[name] = (int(requests or 0), int(spent or 0), int(reserved or 0))
    return quota


class SharedBudgetCounters:
    """BudgetCounters on Redis: `reserve` is async (event loop), `settle` blocking (the writer thread).

    While Redis is unreachable nothing is reserved (the caller refuses budgeted requests: the only way not to
    overshoot), and settlements are kept and retried: until then their reservations count in full.
    """

    def __init__(self, shared: SharedLimits, url: str, saved: Iterable[BudgetState] = ()) -> None:
        self._shared = shared
        self._reserve = shared.client.register_script(RESERVE)
        self._release = shared.client.register_script(SETTLE)
        self._sync = redis.Redis.from_url(url, socket_timeout=_SETTLE_WAIT, socket_connect_timeout=_SETTLE_WAIT,
                                          retry=Retry(NoBackoff(), 0))
        self._settle = self._sync.register_script(SETTLE)
        self._lock = threading.Lock()
        # (token, month) -> (the life of its hash as last seen, the latest state seen): what a lost hash restarts from
        self._known: dict[tuple[str, str], tuple[str, BudgetState]] = {
            (s.token_name, s.month): ("", s) for s in saved}
        self._unsettled: list[tuple[Reservation, int]] = []

    @property
    def up(self) -> bool:
        return self._shared.up

    def went_down(self, error: BaseException) -> None:
        self._shared.went_down(error)

    def _see(self, state: BudgetState, life: str) -> BudgetState:
        with self._lock:
            key = (state.token_name, state.month)
            known = self._known.get(key)
            if known is None or known[0] != life or known[1].version < state.version:
                self._known[key] = (life, state)
        return state

    def state(self, token_name: str, month: str) -> BudgetState:
        """The latest state this instance saw (no round trip: for response headers)."""
        with self._lock:
            known = self._known.get((token_name, month))
        return known[1] if known else BudgetState(token_name, month, 0, 0, 0)

    def new_reservation(self, token_name: str, month: str, amount: int) -> Reservation:
        return Reservation(token_name, month, amount, secrets.token_hex(8))

    async def reserve(self, reservation: Reservation, limit: int) -> tuple[bool, BudgetState]:
        """Reserve atomically across every instance; raise whatever Redis raised (the caller refuses)."""
        name, month = reservation.token_name, reservation.month
        with self._lock:
            life, seen = self._known.get((name, month), ("", BudgetState(name, month, 0, 0, 0)))
        floor = seen.spent_nanousd + seen.reserved_nanousd
        ok, spent, reserved, version, life = await self._reserve(
            keys=[budget_key(name, month)],
            args=[reservation.amount, limit, reservation.id, life, floor, secrets.token_hex(8), seen.version,
                  _expiry(month)],
        )
        return bool(ok), self._see(BudgetState(name, month, int(spent), int(reserved), int(version)), life.decode())

    def settle(self, reservation: Reservation, actual: int | None) -> BudgetState | None:
        """On the writer thread: replace the reservation by `actual` (None keeps it). Never raises."""
        if actual is None:
            return None
        if not self.up:  # no round trip to a Redis known to be away: the writer thread has rows to write
            self._keep(reservation, actual, None)
            return None
        self._retry_unsettled()
        try:
            return self._settled(reservation, self._settle(keys=[budget_key(reservation.token_name, reservation.month)],
                                                           args=[reservation.id, actual]))
        except redis.RedisError as e:
            self._keep(reservation, actual, e)
            return None

    async def release(self, reservation: Reservation) -> BudgetState | None:
        """On the event loop: give a reservation back whole (the request was refused after all)."""
        try:
            found = await self._release(keys=[budget_key(reservation.token_name, reservation.month)],
                                        args=[reservation.id, 0])
        except Exception as e:  # kept, and retried with the next settlement
            self._keep(reservation, 0, e)
            return None
        return self._settled(reservation, found)

    def _settled(self, reservation: Reservation, found: list) -> BudgetState | None:
        if not found[0] and len(found) == 1:
            return None  # the hash is gone with Redis's data: nothing to settle against
        _, spent, reserved, version, life = found
        state = BudgetState(reservation.token_name, reservation.month, int(spent), int(reserved), int(version))
        return self._see(state, life.decode())

    def _keep(self, reservation: Reservation, actual: int, error: BaseException | None) -> None:
        with self._lock:
            first = not self._unsettled
            if len(self._unsettled) < _UNSETTLED_KEPT:
                self._unsettled.append((reservation, actual))
        if first:
            why = f" ({type(error).__name__})" if error is not None else ""
            log.warning("metrion: cannot settle budget reservations on Redis %s%s; retrying once it is back, they "
                        "count in full meanwhile", self._shared.address, why)

    def _retry_unsettled(self) -> None:
        if not self._unsettled or not self.up:
            return
        with self._lock:
            waiting, self._unsettled = self._unsettled, []
        for i, (reservation, actual) in enumerate(waiting):
            try:
                self._settle(keys=[budget_key(reservation.token_name, reservation.month)],
                             args=[reservation.id, actual])
            except redis.RedisError:
                with self._lock:
                    self._unsettled[:0] = waiting[i:]
                return

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._sync.close()


async def admit_on_redis(budgets: Budgets, shared: SharedLimits, name: str, plan: str, now: float, route: Route,
                         method: str, body: bytes, request: RequestBody | None) -> tuple[Hold | None, Admission]:
    """Reserve the budget (if the token has one), then count the limits: one round trip each.

    Raise MetrionError to refuse; a reservation made for a request the limits then refuse is given back.
    """
    counters = budgets.counters
    assert isinstance(counters, SharedBudgetCounters)
    hold = await budgets.admit_shared(counters, name, now, route, method, body, request)
    try:
        return hold, await shared.admit(name, plan, now)
    except BaseException:
        if hold is not None and hold.reservation is not None:
            await counters.release(hold.reservation)
        raise
