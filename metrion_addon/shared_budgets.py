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

from .budgets import Budgets, Hold, Reservation, held
from .errors import MetrionError
from .limits import Admission, next_month_start
from .request_body import RequestBody
from .routes import Route
from .shared_limits import ADMIT_FUNCTION, PREFIX, SharedLimits, month_key
from .store import BudgetState

log = logging.getLogger(__name__)

_MONTH_KEPT = 40 * 86400  # a month's budget outlives the month by this much (for `metrion quota` afterwards)
_SETTLE_WAIT = 2.0  # seconds the writer thread waits on Redis before it keeps a settlement for later
_UNSETTLED_KEPT = 100_000  # settlements kept for a Redis that is away: past this, reservations stay (the safe side)

# A budget is one hash: spent, reserved, version, life (a random id given when the hash was made), floor (the most
# an instance carried over from a lost hash), and r:<reservation id> -> nano-USD for each reservation held.
BUDGET_FUNCTION = """
-- The budget hash as it stands, made again if Redis lost it. seen_life: the hash's life this instance last saw
-- ('' none); floor: spent + reserved as it last saw them; new_life: an id for a hash made now; seen_version: the
-- version it saw.
-- A missing hash that this instance knew (Redis lost its data) starts from the floor; a hash made again by another
-- instance is raised to the highest floor any instance brings, once per instance: nothing known is forgotten.
-- Returns spent, reserved, version, life.
local function budget_state(key, seen_life, floor, new_life, seen_version)
  local life = redis.call('HGET', key, 'life')
  if not life then
    life = new_life
    redis.call('HSET', key, 'life', life, 'spent', floor, 'reserved', '0', 'floor', floor, 'version', seen_version)
  elseif seen_life ~= '' and seen_life ~= life then
    local known, mine = tonumber(redis.call('HGET', key, 'floor') or '0'), tonumber(floor)
    if mine > known then
      redis.call('HINCRBY', key, 'spent', mine - known)
      redis.call('HSET', key, 'floor', floor)
    end
  end
  local state = redis.call('HMGET', key, 'spent', 'reserved', 'version')
  return tonumber(state[1]), tonumber(state[2]), tonumber(state[3]), life
end
"""

ADMIT_AND_RESERVE = ADMIT_FUNCTION + BUDGET_FUNCTION + """
-- One budgeted admission, all or nothing. KEYS: the token's bucket, its month's counter, its budget hash.
-- ARGV[1..6]: ADMIT's (now, per minute, cap, counter expiry, bucket ttl, counts); ARGV[7..14]: amount (nano-USD),
-- limit, reservation id, seen life, floor, new life, seen version, budget expiry (unix s).
-- The budget is checked first (a request it refuses takes nothing from the limits), then the limits; only a
-- request both admit is reserved, so nothing has to be given back.
-- Returns {quota_ok, rate_ok, tokens, used, reserved (1, 0; -1: the budget refused first), spent, reserved, version,
-- life}.
local key, amount = KEYS[3], tonumber(ARGV[7])
local spent, reserved, version, life = budget_state(key, ARGV[10], ARGV[11], ARGV[12], ARGV[13])
redis.call('EXPIREAT', key, ARGV[14])
if spent + reserved + amount > tonumber(ARGV[8]) then
  return {1, 1, '0', 0, -1, string.format('%d', spent), string.format('%d', reserved), version, life}
end
local quota_ok, rate_ok, tokens, used = admit_limits(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]),
                                                     tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6] == '1')
local ok = 0
if quota_ok == 1 and rate_ok == 1 then
  reserved = redis.call('HINCRBY', key, 'reserved', amount)
  redis.call('HSET', key, 'r:' .. ARGV[9], ARGV[7])
  version = redis.call('HINCRBY', key, 'version', 1)
  ok = 1
end
return {quota_ok, rate_ok, tokens, used, ok, string.format('%d', spent), string.format('%d', reserved), version, life}
"""

HAND_BACK = BUDGET_FUNCTION + """
-- What this instance saw of each budget, handed to a Redis that may have lost it (at start-up, and when Redis
-- answers again). KEYS: budget hashes; ARGV, five per key: seen life, floor, new life, seen version, expiry.
-- Returns {spent, reserved, version, life} per key.
local out = {}
for i, key in ipairs(KEYS) do
  local b = 5 * (i - 1)
  local spent, reserved, version, life = budget_state(key, ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4])
  redis.call('EXPIREAT', key, ARGV[b + 5])
  out[i] = {string.format('%d', spent), string.format('%d', reserved), version, life}
end
return out
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
    """Budget counters on Redis: reserved with the limits in one async script (event loop), settled blocking (on
    the writer thread).

    While Redis is unreachable nothing is reserved (the caller refuses budgeted requests: the only way not to
    overshoot), and settlements are kept and retried: until then their reservations count in full.
    """

    def __init__(self, shared: SharedLimits, url: str, saved: Iterable[BudgetState] = ()) -> None:
        self._shared = shared
        self._admit_reserve = shared.client.register_script(ADMIT_AND_RESERVE)
        self._sync = redis.Redis.from_url(url, socket_timeout=_SETTLE_WAIT, socket_connect_timeout=_SETTLE_WAIT,
                                          retry=Retry(NoBackoff(), 0))
        self._settle = self._sync.register_script(SETTLE)
        self._lock = threading.Lock()
        # (token, month) -> (the life of its hash as last seen, the latest state seen): what a lost hash restarts from
        self._known: dict[tuple[str, str], tuple[str, BudgetState]] = {
            (s.token_name, s.month): ("", s) for s in saved}
        self._unsettled: list[tuple[Reservation, int]] = []
        self._hand_back_async = shared.client.register_script(HAND_BACK)
        shared.recovery.append(self._hand_back)
        pairs, keys, args = self._hand_back_call()
        if keys:  # at start-up, blocking like the limits' own connect; Redis away: the recovery hands them back
            with contextlib.suppress(redis.RedisError):
                self._saw(pairs, self._sync.register_script(HAND_BACK)(keys=keys, args=args))

    def _hand_back_call(self) -> tuple[list[tuple[str, str]], list[str], list]:
        with self._lock:
            known = list(self._known.items())
        keys, args = [], []
        for (name, month), (life, seen) in known:
            keys.append(budget_key(name, month))
            args += [life, seen.spent_nanousd + seen.reserved_nanousd, secrets.token_hex(8), seen.version,
                     _expiry(month)]
        return [pair for pair, _ in known], keys, args

    async def _hand_back(self) -> None:
        """Give Redis back what this instance saw of each budget (a no-op where Redis kept it)."""
        pairs, keys, args = self._hand_back_call()
        if keys:
            self._saw(pairs, await self._hand_back_async(keys=keys, args=args))

    def _saw(self, pairs: list[tuple[str, str]], found: list) -> None:
        for (name, month), (spent, reserved, version, life) in zip(pairs, found, strict=True):
            self._see(BudgetState(name, month, int(spent), int(reserved), int(version)), life.decode())

    @property
    def up(self) -> bool:
        return self._shared.up

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

    async def admit_and_reserve(self, reservation: Reservation, limit: int, admission: tuple[list[str], list]
                                ) -> tuple[list, BudgetState]:
        """Count the limits and reserve the budget in one atomic script; raise whatever Redis raised.

        `admission`: the limits' keys and arguments (SharedLimits.admission). Returns the limits' four values with
        the reservation's outcome (1, 0, or -1 when the budget refused first) and the budget's state.
        """
        name, month = reservation.token_name, reservation.month
        with self._lock:
            life, seen = self._known.get((name, month), ("", BudgetState(name, month, 0, 0, 0)))
        keys, args = admission
        found = await self._admit_reserve(
            keys=[*keys, budget_key(name, month)],
            args=[*args, reservation.amount, limit, reservation.id, life, seen.spent_nanousd + seen.reserved_nanousd,
                  secrets.token_hex(8), seen.version, _expiry(month)],
        )
        *limits, spent, reserved, version, life = found
        return limits, self._see(BudgetState(name, month, int(spent), int(reserved), int(version)), life.decode())

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
    """Count the limits and, if the token has a budget, reserve the request's bound: one round trip either way.

    Raise MetrionError to refuse: 429 from the budget or the limits, 503 from a Redis that cannot be reached
    (a budgeted request is refused under both `on_failure` modes: a share of a budget could overshoot it).
    """
    counters = budgets.counters
    assert isinstance(counters, SharedBudgetCounters)
    asked = budgets.ask(name, now, route, method, body, request)
    if asked is None or isinstance(asked, Hold):  # no budget, or nothing to reserve
        return asked, await shared.admit(name, plan, now)
    if shared.up:
        reservation = Reservation(name, asked.month, asked.amount, secrets.token_hex(8))
        try:
            limits, state = await counters.admit_and_reserve(reservation, asked.budget.limit,
                                                             shared.admission(name, plan, now))
        except Exception as e:  # whatever went wrong, nothing is forwarded unreserved
            shared.went_down(e)
        else:
            quota_ok, rate_ok, tokens, used, reserved = limits
            hold = held(reservation, asked.budget, asked.bound, reserved >= 0, state)  # raises budget_exceeded
            return hold, shared.admitted(name, plan, now, True, quota_ok, rate_ok, tokens, used)
    raise MetrionError(503, "budget_unavailable", (
        f"Metrion token '{name}' has a monthly budget, and Metrion cannot reach the shared budget store (Redis) "
        "to reserve this request's cost; request not forwarded."
    ))
