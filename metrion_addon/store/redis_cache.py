"""The response cache on Redis, shared by every instance: one script per lookup and per store, on the async client.

Entries expire through Redis (their lifetime as a TTL); a size bound of Metrion's own evicts the least recently used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable

import redis
import redis.asyncio

from .records import CacheEntry, RequestRecord

log = logging.getLogger(__name__)

PREFIX = "metrion:cache:"
ENTRY = PREFIX + "e:"  # + key: hash of meta (JSON), body, cost
LRU = PREFIX + "lru"  # sorted set: key -> last used (unix s)
EXPIRES = PREFIX + "expires"  # sorted set: key -> expires at (unix s)
SIZES = PREFIX + "sizes"  # hash: key -> bytes counted against the bound
BYTES = PREFIX + "bytes"  # the sum of SIZES
_PURGED_PER_PUT = 100  # expired entries forgotten per store, at most (they are gone already: only accounting)

# Keys of evicted entries are built in the script from ARGV[1]'s prefix: one Redis, not a cluster.
PUT = """
-- Store one entry and keep the cache within its bound. KEYS: entry hash, LRU set, expiry set, sizes, total bytes.
-- ARGV: entry prefix, key, meta, body, cost ('' unknown), ttl (ms), now (s), expires at (s), size, max bytes,
-- how many expired entries to forget. Returns how many entries were evicted.
local prefix, member, now = ARGV[1], ARGV[2], ARGV[7]
local function forget(victim)
  local size = tonumber(redis.call('HGET', KEYS[4], victim) or '0')
  redis.call('ZREM', KEYS[2], victim)
  redis.call('ZREM', KEYS[3], victim)
  redis.call('HDEL', KEYS[4], victim)
  redis.call('DEL', prefix .. victim)
  return redis.call('DECRBY', KEYS[5], size)
end
for _, victim in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[11]))) do
  forget(victim)
end
forget(member)
redis.call('HSET', KEYS[1], 'meta', ARGV[3], 'body', ARGV[4], 'cost', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], now, member)
redis.call('ZADD', KEYS[3], ARGV[8], member)
redis.call('HSET', KEYS[4], member, ARGV[9])
local total = redis.call('INCRBY', KEYS[5], ARGV[9])
local evicted = 0
while total > tonumber(ARGV[10]) do
  local victim = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not victim then break end
  total = forget(victim)
  evicted = evicted + 1
end
return evicted
"""

FORGET = """
-- Delete entries and their accounting. KEYS: LRU set, expiry set, sizes, total bytes; ARGV: entry prefix, keys.
-- Returns how many entries were held.
local held = 0
for i = 2, #ARGV do
  local size = redis.call('HGET', KEYS[3], ARGV[i])
  if size then
    held = held + 1
    redis.call('DECRBY', KEYS[4], size)
  end
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('DEL', ARGV[1] .. ARGV[i])
end
return held
"""

GET = """
-- Look up one entry and mark it used. KEYS: entry hash, LRU set; ARGV: key, now (s). Returns {meta, body, cost}.
local found = redis.call('HMGET', KEYS[1], 'meta', 'body', 'cost')
if not found[1] then return nil end
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
return found
"""


def _meta(entry: CacheEntry) -> str:
    return json.dumps({"token_name": entry.token_name, "provider": entry.provider, "model": entry.model,
                       "status": entry.status, "headers": entry.headers, "stream": entry.stream,
                       "created_at": entry.created_at, "expires_at": entry.expires_at})


def _entry(key: str, meta: bytes, body: bytes, cost: bytes) -> CacheEntry:
    fields = json.loads(meta)
    return CacheEntry(key, fields["token_name"], fields["provider"], fields["model"], fields["status"],
                      tuple(tuple(pair) for pair in fields["headers"]), body, fields["stream"],
                      fields["created_at"], fields["expires_at"], float(cost) if cost else None)


class RedisCacheStore:
    """CacheStore on Redis: a lookup is one awaited script; a store runs as a task and never delays the answer.

    An entry's cost is priced when it is stored, with the same prices as the row.
    """

    def __init__(self, client: redis.asyncio.Redis, max_bytes: int,
                 price: Callable[[RequestRecord], tuple[float | None, str | None]]) -> None:
        self._get = client.register_script(GET)
        self._put = client.register_script(PUT)
        self._max_bytes = max_bytes
        self._price = price
        self._tasks: set[asyncio.Task] = set()

    def reprice(self, price: Callable[[RequestRecord], tuple[float | None, str | None]]) -> None:
        self._price = price

    async def get(self, key: str, now: float) -> CacheEntry | None:
        try:
            found = await self._get(keys=[ENTRY + key, LRU], args=[key, repr(now)])
        except Exception as e:  # a lookup that fails is a miss: the request is forwarded and metered as usual
            log.warning("metrion: cache lookup on Redis failed, answering from the provider: %s", e)
            return None
        if found is None:
            return None
        entry = _entry(key, *found)
        return entry if entry.expires_at > now else None

    def put(self, entry: CacheEntry, origin: RequestRecord) -> None:
        try:
            cost = origin.cost_usd if origin.price_source is not None else self._price(origin)[0]
        except Exception:  # a hit then reports no saving; the entry itself is sound
            log.exception("metrion: could not price a cache entry")
            cost = None
        task = asyncio.get_running_loop().create_task(self._store(entry, cost))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(self, entry: CacheEntry, cost: float | None) -> None:
        ttl_ms = max(1, math.ceil((entry.expires_at - entry.created_at) * 1000))
        try:
            await self._put(
                keys=[ENTRY + entry.key, LRU, EXPIRES, SIZES, BYTES],
                args=[ENTRY, entry.key, _meta(entry), entry.body, "" if cost is None else repr(cost), ttl_ms,
                      repr(entry.created_at), repr(entry.expires_at), entry.size, self._max_bytes, _PURGED_PER_PUT],
            )
        except Exception as e:  # not cached: the next identical request is forwarded, as a miss
            log.warning("metrion: could not store a cache entry on Redis: %s", e)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()


# the command line (blocking)


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)


def held_on_redis(url: str, now: float) -> dict[str, int]:
    """What the shared cache holds: entries (fresh), expired ones not yet forgotten, and bytes counted."""
    client = _client(url)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.zcard(EXPIRES)
        pipe.zcount(EXPIRES, "-inf", now)
        pipe.get(BYTES)
        total, expired, size = pipe.execute()
    finally:
        client.close()
    return {"entries": total - expired, "expired": expired, "bytes": int(size or 0)}


def clear_on_redis(url: str, token: str | None = None, model: str | None = None,
                   base_model: Callable[[str], str] = str) -> int:
    """Delete the shared cache's entries of `token` and of `model` (as returned, or as `base_model` of it)."""
    client = _client(url)
    try:
        keys = [key.decode() for key in client.hkeys(SIZES)]  # an expired entry has no meta: it goes when all go
        if token is not None or model is not None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hget(ENTRY + key, "meta")
            metas = pipe.execute()
            keys = [key for key, meta in zip(keys, metas, strict=True) if meta is not None
                    and _matches(json.loads(meta), token, model, base_model)]
        removed = 0
        forget = client.register_script(FORGET)
        for start in range(0, len(keys), 500):
            removed += forget(keys=[LRU, EXPIRES, SIZES, BYTES], args=[ENTRY, *keys[start:start + 500]])
        return removed
    finally:
        client.close()


def _matches(meta: dict, token: str | None, model: str | None, base_model: Callable[[str], str]) -> bool:
    stored = meta.get("model")
    return ((token is None or meta.get("token_name") == token)
            and (model is None or stored == model or (stored is not None and base_model(stored) == model)))
