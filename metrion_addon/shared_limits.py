"""Limits shared by every instance on one Redis: the token bucket and the monthly cap in one atomic Lua script.

One round trip per admission (redis.asyncio); without Redis, `closed` refuses and `local` keeps a share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import ConfigError, Shared
from .errors import MetrionError
from .limits import Admission, CalendarMonth, QuotaDecision, RateDecision, RateLimiter, decide, next_month_start
from .store import MonthlyCount

log = logging.getLogger(__name__)

PREFIX = "metrion:"
INSTANCES_KEY = PREFIX + "instances"
HEARTBEAT_SECONDS = 2.0
_INSTANCE_TTL_MS = 6000  # an instance not heard from for this long no longer counts
_BUCKET_TTL = 120  # seconds: an idle bucket is full again after 60 s, so an expired one loses nothing
_MONTH_KEPT = 40 * 86400  # a month's counter outlives the month by this much (for `metrion quota` afterwards)
_REMINDER_SECONDS = 30.0
_CONNECTIONS = 64
# Seconds an admission waits for a connection or an answer. A dead Redis refuses at once; this bounds a hung one,
# and is long because a burst can keep the event loop itself busy for a second or more on a loaded machine.
_WAIT = 5.0

ADMIT_FUNCTION = """
-- One admission: the token's bucket (hash tokens, updated) and its counter for this month. now (unix s), requests
-- per minute, monthly cap (-1 = none), counter expiry (unix s), bucket ttl (s), whether the request counts toward
-- the cap (false: answered from the response cache, the bucket only).
-- The cap is checked, then the bucket taken, then the cap counted: a refused request costs no quota.
-- Returns quota_ok, rate_ok (-1 when the cap refused first), tokens left (string), requests this month.
local function admit_limits(bucket, counter, now, capacity, cap, expiry, ttl, counts)
  local used = tonumber(redis.call('GET', counter) or '0')
  if counts and cap >= 0 and used >= cap then return 0, -1, '0', used end
  local state = redis.call('HMGET', bucket, 'tokens', 'updated')
  local tokens = math.min(capacity, tonumber(state[1]) or capacity)
  local updated = tonumber(state[2]) or now
  if now > updated then
    tokens = math.min(capacity, tokens + (now - updated) * capacity / 60)
    updated = now
  end
  local ok = 0
  if tokens >= 1 then tokens = tokens - 1; ok = 1 end
  redis.call('HSET', bucket, 'tokens', string.format('%.17g', tokens), 'updated', string.format('%.17g', updated))
  redis.call('EXPIRE', bucket, ttl)
  if ok == 1 and counts then
    used = redis.call('INCR', counter)
    redis.call('EXPIREAT', counter, expiry)
  end
  return 1, ok, string.format('%.17g', tokens), used
end
"""

ADMIT = ADMIT_FUNCTION + """
-- KEYS: the bucket, the month's counter; ARGV: now, per minute, cap, counter expiry, bucket ttl, '1' if it counts.
return {admit_limits(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5],
                     ARGV[6] == '1')}
"""

RECONCILE = """
-- Hand counts kept elsewhere to Redis. KEYS: monthly counters; ARGV: (known, added, expiry) per key.
-- A counter Redis still has gains `added`; one it lost (a restart without persistence) becomes known + added.
for i, key in ipairs(KEYS) do
  local known, added, expiry = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), ARGV[3*i]
  if redis.call('EXISTS', key) == 1 then
    if added > 0 then redis.call('INCRBY', key, added) end
  else
    redis.call('SET', key, known + added)
  end
  redis.call('EXPIREAT', key, expiry)
end
return #KEYS
"""

HEARTBEAT = """
-- KEYS[1]: hash instance id -> '<expiry ms> <config fingerprint>'; ARGV: this id, its fingerprint, ttl ms.
-- Refreshes this instance, forgets expired ones, returns the fingerprints of the others still alive.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local others = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] then
    local expiry, fingerprint = string.match(all[i + 1], '^(%d+) (%S+)$')
    if expiry == nil or tonumber(expiry) < now then
      redis.call('HDEL', KEYS[1], all[i])
    else
      table.insert(others, fingerprint)
    end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', now + tonumber(ARGV[3])) .. ' ' .. ARGV[2])
return others
"""


def bucket_key(name: str) -> str:
    return f"{PREFIX}rate:{name}"


def month_key(name: str, month: str) -> str:
    return f"{PREFIX}month:{name}:{month}"


def bucket_levels(url: str, names: list[str]) -> dict[str, tuple[float, float]]:
    """Each token's bucket as Redis holds it now, (tokens, updated), in one round trip; a token whose bucket
    expired (idle two minutes: full again) is left out. Synchronous, for readers beside the proxy (the
    dashboard); raises redis.RedisError when Redis cannot answer within half a second."""
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(bucket_key(name), "tokens", "updated")
        found = pipe.execute()
    finally:
        client.close()
    return {name: (float(tokens), float(updated)) for name, (tokens, updated) in zip(names, found, strict=True)
            if tokens is not None and updated is not None}


def redis_address(url: str) -> str:
    """host:port of a Redis URL, for messages (the URL may carry a password)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path


@dataclass(frozen=True)
class Share:
    """What one of `instances` may admit on its own while Redis is unreachable."""

    per_minute: int
    instances: int

    def of_cap(self, cap: int, known: int) -> int:
        """Its share of what was left of a monthly cap when Redis was last reached."""
        return max(0, cap - known) // self.instances


def share_of(per_minute: int, instances: int) -> Share:
    instances = max(1, instances)
    return Share(max(1, per_minute // instances), instances)


class SharedLimits:
    """The limits of every instance sharing `shared.redis`, decided in Redis; this instance's share without it."""

    def __init__(self, shared: Shared, per_minute: int, caps: Mapping[str, int | None], fingerprint: str,
                 months: list[MonthlyCount]) -> None:
        self.address = redis_address(shared.redis)
        self.on_failure = shared.on_failure
        self.per_minute = per_minute
        self.fingerprint = fingerprint
        self.instances = 1  # live instances (this one included) at the last heartbeat
        self.error: str | None = "not connected yet"  # None while Redis answers
        # Run (in order) when Redis answers again, before admissions resume; a failure counts as Redis still away.
        self.recovery: list[Callable[[], Awaitable[None]]] = []
        self._url = shared.redis
        self._caps = caps
        self._id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # A bounded pool that queues admissions for a free connection, rather than opening one per request.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            shared.redis, max_connections=_CONNECTIONS, timeout=_WAIT, socket_timeout=_WAIT,
            socket_connect_timeout=_WAIT,
        )
        self._client = redis.asyncio.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self._admit = self._client.register_script(ADMIT)
        self._reconcile = self._client.register_script(RECONCILE)
        self._heartbeat = self._client.register_script(HEARTBEAT)
        self._month = CalendarMonth()
        self._known: dict[tuple[str, str], int] = {(m.token_name, m.month): m.requests for m in months}
        self._added: dict[tuple[str, str], int] = {}  # admitted locally while Redis was unreachable
        self._local_rates: RateLimiter | None = None
        self._share = share_of(per_minute, 1)
        self._task: asyncio.Task | None = None
        self._mismatch_logged = False
        self._reminded = 0.0

    @property
    def up(self) -> bool:
        return self.error is None

    @property
    def client(self) -> redis.asyncio.Redis:
        """The async client (its bounded pool) that the budgets and the cache share with the limits."""
        return self._client

    def reconfigure(self, per_minute: int, caps: Mapping[str, int | None], fingerprint: str) -> None:
        """New limits from a reloaded config (the next heartbeat tells the others); the counts stay in Redis."""
        self.per_minute, self._caps, self.fingerprint = per_minute, caps, fingerprint

    # start-up, in configure: the only blocking calls, before any request

    def connect(self, now: float) -> None:
        """Check that every live instance shares this config, hand Redis the stored counts; raise ConfigError if not.

        An unreachable Redis is not an error here: the instance starts degraded and reconnects by itself.
        """
        client = redis.Redis.from_url(self._url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                      retry=Retry(NoBackoff(), 0))
        try:
            others = client.register_script(HEARTBEAT)(keys=[INSTANCES_KEY],
                                                       args=[self._id, self.fingerprint, _INSTANCE_TTL_MS])
            differing = [f for f in others if f.decode() != self.fingerprint]
            if differing:
                client.hdel(INSTANCES_KEY, self._id)
                raise ConfigError(
                    f"shared.redis: tokens, plans or limits differ from {len(differing)} of {len(others)} running "
                    f"instance(s) on {self.address}: give every instance the same config file"
                )
            keys, args = self._reconcile_args(self._known, {}, now)
            if keys:
                client.register_script(RECONCILE)(keys=keys, args=args)
        except redis.RedisError as e:
            self.went_down(e)
            return
        finally:
            client.close()
        self.instances = len(others) + 1
        self.error = None
        log.info("metrion: limits shared on Redis %s with %d other instance(s)", self.address, len(others))

    def start(self) -> None:
        """Start the heartbeat (which also reconnects) on the running event loop; idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._beat())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        with contextlib.suppress(redis.RedisError):  # else it expires from the others' view within seconds
            client = redis.Redis.from_url(self._url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                          retry=Retry(NoBackoff(), 0))
            client.hdel(INSTANCES_KEY, self._id)
            client.close()
        with contextlib.suppress(RuntimeError):  # no loop any more: its sockets close with the process
            asyncio.get_running_loop().create_task(self._client.aclose())

    # the hot path

    async def admit(self, name: str, plan: str, now: float, counts: bool = True) -> Admission:
        """Count one request of token `name` across every instance; raise MetrionError (429, or 503 if `closed`).

        `counts=False`: a request answered from the response cache takes from the bucket, not from the cap.
        """
        if self.error is not None:
            return self._admit_without_redis(name, plan, now, counts)
        keys, args = self.admission(name, plan, now, counts)
        try:
            found = await self._admit(keys=keys, args=args)
        except Exception as e:  # whatever went wrong, the request is decided without Redis, never let through
            self.went_down(e)
            return self._admit_without_redis(name, plan, now, counts)
        return self.admitted(name, plan, now, counts, *found)

    def admission(self, name: str, plan: str, now: float, counts: bool = True) -> tuple[list[str], list]:
        """ADMIT's keys and arguments for one request (the budgets' script runs the same function with them)."""
        month, resets_at = self._month(now)
        cap = self._caps[plan]
        return ([bucket_key(name), month_key(name, month)],
                [repr(now), self.per_minute, -1 if cap is None else cap, int(resets_at) + _MONTH_KEPT, _BUCKET_TTL,
                 int(counts)])

    def admitted(self, name: str, plan: str, now: float, counts: bool, quota_ok: int, rate_ok: int, tokens: bytes,
                 used: int) -> Admission:
        """The admission ADMIT decided; raise MetrionError (429) if it refused."""
        month, resets_at = self._month(now)
        key = (name, month)
        self._known[key] = max(used, self._known.get(key, 0))
        quota = QuotaDecision(bool(quota_ok), self._caps[plan], used, resets_at)
        rate = None if rate_ok < 0 else bucket_decision(self.per_minute, float(tokens), bool(rate_ok))
        return decide(name, plan, quota, rate, now, (MonthlyCount(name, month, used),) if counts else ())

    def _admit_without_redis(self, name: str, plan: str, now: float, counts: bool) -> Admission:
        if self.on_failure == "closed":
            raise MetrionError(503, "limits_unavailable", (
                "Metrion cannot reach the shared limit store (Redis), so it cannot count this request; "
                "request not forwarded."
            ))
        month, resets_at = self._month(now)
        cap = self._caps[plan]
        key = (name, month)
        added = self._added.get(key, 0)
        share = None if cap is None else self._share.of_cap(cap, self._known.get(key, 0))
        if counts and share is not None and added >= share:
            return decide(name, plan, QuotaDecision(False, cap, cap, resets_at), None, now, ())
        if self._local_rates is None:
            self._local_rates = RateLimiter(self._share.per_minute)
        rate = self._local_rates.take(name, now)
        if rate.allowed and counts:
            self._added[key] = added = added + 1
        used = self._known.get(key, 0) + added if cap is None or share is None else cap - (share - added)
        return decide(name, plan, QuotaDecision(True, cap, used, resets_at), rate, now, ())

    # heartbeat, failure and recovery

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS if self.error is None else HEARTBEAT_SECONDS / 4)
            recovering = self.error is not None
            try:
                if recovering:  # connections from before the failure are dead: admissions must not meet them
                    await self._client.connection_pool.disconnect()
                others = await self._heartbeat(keys=[INSTANCES_KEY], args=[self._id, self.fingerprint,
                                                                           _INSTANCE_TTL_MS])
                if recovering:
                    await self._hand_back_local_counts()
                    for hand_back in self.recovery:  # before any admission: what others keep in Redis goes back first
                        await hand_back()
            except Exception as e:  # the loop must outlive any failure: it is what reconnects
                self.went_down(e)
                continue
            self._agree(others)
            # A Redis that restarted has not heard from the others yet: keep the count until they beat again.
            self.instances = max(self.instances, len(others) + 1) if recovering else len(others) + 1
            with contextlib.suppress(Exception):  # only freshens the local fallback's view: the next beat retries
                await self._refresh_known()
            if self.error is not None:
                log.warning("metrion: Redis %s reachable again: limits are shared again", self.address)
                self.error = None

    async def _refresh_known(self) -> None:
        """Learn what the other instances counted, so that a fallback share starts from the latest totals."""
        keys = list(self._known)
        if keys:
            values = await self._client.mget([month_key(name, month) for name, month in keys])
            for key, value in zip(keys, values, strict=True):
                if value is not None:
                    self._known[key] = max(self._known[key], int(value))

    def _agree(self, others: list[bytes]) -> None:
        differing = sum(f.decode() != self.fingerprint for f in others)
        if differing and not self._mismatch_logged:
            log.error("metrion: tokens, plans or limits differ from %d other instance(s) on Redis %s "
                      "(a reload in progress, or config files that disagree)", differing, self.address)
        self._mismatch_logged = bool(differing)

    async def _hand_back_local_counts(self) -> None:
        keys, args = self._reconcile_args(self._known, self._added, None)
        if keys:
            await self._reconcile(keys=keys, args=args)
        for key, added in self._added.items():
            self._known[key] = self._known.get(key, 0) + added
        self._added.clear()
        self._local_rates = None

    def _reconcile_args(self, known: Mapping[tuple[str, str], int], added: Mapping[tuple[str, str], int],
                        now: float | None) -> tuple[list[str], list[int]]:
        keys: list[str] = []
        args: list[int] = []
        current = self._month(now)[0] if now is not None else None
        for name, month in {*known, *added}:
            if current is not None and month != current:
                continue
            keys.append(month_key(name, month))
            start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC).timestamp()
            expiry = int(next_month_start(start)) + _MONTH_KEPT
            args += [known.get((name, month), 0), added.get((name, month), 0), expiry]
        return keys, args

    def went_down(self, error: BaseException) -> None:
        loop_time = time.monotonic()
        if self.error is None:
            self._share = share_of(self.per_minute, self.instances)
            if self.on_failure == "closed":
                what = "answering 503 to every request until it is back (shared.on_failure: closed)"
            else:
                what = (f"enforcing this instance's share locally: {self._share.per_minute} requests/min per token "
                        f"and 1/{self._share.instances} of what is left of each monthly cap; tokens with a dollar "
                        "budget are refused until it is back (shared.on_failure: local)")
            log.error("metrion: Redis %s unreachable (%s): %s", self.address, _describe(error), what)
            self._reminded = loop_time
        elif loop_time - self._reminded >= _REMINDER_SECONDS:
            log.error("metrion: Redis %s still unreachable (%s)", self.address, _describe(error))
            self._reminded = loop_time
        self.error = _describe(error)


def bucket_decision(per_minute: int, tokens: float, allowed: bool) -> RateDecision:
    rate = per_minute / 60
    return RateDecision(
        allowed=allowed,
        limit=per_minute,
        remaining=math.floor(tokens),
        reset_seconds=max(0.0, (per_minute - tokens) / rate),
        retry_after=0.0 if allowed else max(0.0, (1 - tokens) / rate),
    )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
