"""The response cache: which requests ask for it, the key and lifetime of an entry, what may be stored, the replay.

Pure functions over plain data (the caller passes the time); entries live behind `CacheStore` (store/cache.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol
from urllib.parse import parse_qsl

from .errors import MetrionError
from .request_body import RequestBody, needs_stream_usage
from .routes import Route
from .store import CacheEntry, RequestRecord

HEADER = "x-metrion-cache"
DEFAULT_MAX_AGE = 7 * 86_400
LONGEST_MAX_AGE = 365 * 86_400
# Top-level body fields that cannot change the answer, left out of the key.
IGNORED_FIELDS = frozenset({"stream_options", "user", "metadata"})
# Query parameters that carry a credential: never part of a key (a key is stored).
_CREDENTIAL_PARAMS = frozenset({"key", "api_key", "apikey", "access_token", "token"})
# Where a client's own provider key travels (pass-through and HTTPS_PROXY modes).
_PROVIDER_KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
# The provider headers a hit replays: what clients read (body type, encoding, the provider's request id).
STORED_HEADERS = ("content-type", "content-encoding", "request-id", "x-request-id")
_DIGITS = re.compile(r"[0-9]+")


class Mode(StrEnum):
    LOOKUP = "true"  # answer from the cache if fresh, else forward and store
    REFRESH = "refresh"  # forward and overwrite


class Outcome(StrEnum):
    """The `x-metrion-cache` response header and the row's `cache_status` column."""

    HIT = "HIT"
    MISS = "MISS"
    REFRESH = "REFRESH"


@dataclass(frozen=True)
class CachePlan:
    """What one request asked of the cache, decided before it is admitted."""

    mode: Mode
    key: str
    max_age: int  # seconds an entry stored from this request stays fresh


class CacheStore(Protocol):
    """Where entries live. SQLite (store/cache.py) today; a shared store (Redis) implements the same three calls.

    `get` must not block the event loop; `put` returns at once and stores later (through the writer thread for
    SQLite), taking the entry's `cost_usd` from `origin` once the writer has priced that row. Size bound, LRU
    eviction and purging of expired entries are the store's job.
    """

    async def get(self, key: str, now: float) -> CacheEntry | None:
        """The fresh entry under `key` at `now` (marking it used), or None."""

    def put(self, entry: CacheEntry, origin: RequestRecord) -> None:
        """Store `entry`, replacing any entry under its key."""

    def close(self) -> None:
        """Release what the store holds; called once, when Metrion stops or reloads its config."""


def scope(token_name: str, mode: str, headers: Mapping[str, str], share_across_tokens: bool) -> str:
    """Who may read an entry: the Metrion token (or everyone, if the config shares entries across tokens), and,
    when the client sends its own provider key, that key too (hashed): a hit must never answer a key the provider
    was not shown, so a valid Metrion token with a wrong provider key reads nothing."""
    who = "*" if share_across_tokens else f"token:{token_name}"
    if mode == "stored":
        return who
    key = "\n".join(headers.get(name, "") for name in _PROVIDER_KEY_HEADERS)
    return f"{who} key:{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()}"


def parse_mode(value: str | None) -> Mode | None:
    """The `x-metrion-cache` request header: None when absent or `false`; raise MetrionError(400) if unknown."""
    if value is None:
        return None
    text = value.strip().lower()
    if text == "false":
        return None
    try:
        return Mode(text)
    except ValueError:
        raise MetrionError(400, "invalid_cache_header", (
            f"x-metrion-cache: {value.strip()[:40]!r} is not a cache directive (use true, refresh or false)."
        )) from None


def parse_max_age(cache_control: str | None) -> int:
    """Seconds an entry stays fresh: `Cache-Control: max-age=N`, default 7 days, larger values clamped to 365 days.

    Raise MetrionError(400) if max-age is malformed, negative or given twice.
    """
    if cache_control is None:
        return DEFAULT_MAX_AGE
    directives = (part.partition("=") for part in cache_control.split(","))
    found = [(sign, value.strip()) for name, sign, value in directives if name.strip().lower() == "max-age"]
    if not found:
        return DEFAULT_MAX_AGE
    if len(found) > 1:
        raise _bad_max_age(cache_control)
    sign, value = found[0]
    if len(value) > 1 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not sign or not _DIGITS.fullmatch(value):
        raise _bad_max_age(cache_control)
    return LONGEST_MAX_AGE if len(value) > 9 else min(int(value), LONGEST_MAX_AGE)


def _bad_max_age(cache_control: str) -> MetrionError:
    return MetrionError(400, "invalid_cache_control", (
        f"Cache-Control: {cache_control.strip()[:60]!r}: max-age must be one whole number of seconds "
        f"(0 to {LONGEST_MAX_AGE}; larger values are clamped)."
    ))


def canonical_body(parsed: dict | None, raw: bytes) -> bytes:
    """The body as the key sees it: sorted keys, no whitespace, minus `IGNORED_FIELDS`; other bodies verbatim."""
    if parsed is None:
        return b"raw:" + raw
    kept = {name: value for name, value in parsed.items() if name not in IGNORED_FIELDS}
    try:
        return b"json:" + json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     allow_nan=True).encode("utf-8", "surrogatepass")
    except (RecursionError, ValueError):  # nested too deep to re-encode: the exact bytes are still a sound key
        return b"raw:" + raw


def _query(query: str) -> list[tuple[str, str]]:
    pairs = parse_qsl(query, keep_blank_values=True)
    return sorted((name, value) for name, value in pairs if name.lower() not in _CREDENTIAL_PARAMS)


def cache_key(scope: str, route: Route, method: str, request: RequestBody | None, raw_body: bytes,
              include_usage: bool) -> str:
    """SHA-256 over everything that can change the answer or the bytes the client receives.

    `scope` says who may read the entry (see `scope`). Whether Metrion
    hides an injected usage chunk from this client (`include_usage`: the provider is asked for one) is part of
    the key: it changes the bytes of the stream.
    """
    _, _, query = route.upstream_url.partition("?")
    stream = bool(request and request.stream)
    hidden_usage = bool(request and needs_stream_usage(route, request, include_usage))
    head = json.dumps([scope, route.provider, route.endpoint, _query(query), method.upper(), stream, hidden_usage],
                      separators=(",", ":")).encode("utf-8", "surrogatepass")
    body = canonical_body(request.parsed if request else None, raw_body)
    return hashlib.sha256(head + b"\n" + body).hexdigest()


def plan(headers: Mapping[str, str], scope: str, route: Route, method: str, request: RequestBody | None,
         raw_body: bytes, include_usage: bool) -> CachePlan | None:
    """The request's cache plan from its (lower-cased) headers; None if it did not ask; MetrionError(400) if bad."""
    mode = parse_mode(headers.get(HEADER))
    if mode is None:
        return None
    max_age = parse_max_age(headers.get("cache-control"))
    return CachePlan(mode, cache_key(scope, route, method, request, raw_body, include_usage), max_age)


def entry_for(plan: CachePlan, record: RequestRecord, headers: Mapping[str, str], body: bytes | None, *,
              stream: bool, complete: bool, now: float, max_bytes: int) -> CacheEntry | None:
    """The entry to store for a finished reply, or None when it must not be cached.

    Only complete 2xx replies from the provider: no error on the row (Metrion's own answers, provider errors
    and erroring streams all carry one), a stream whose terminal event the meter saw (`complete`), a lifetime
    above zero, and at most `max_bytes`. Timeouts and cut connections end in mitmproxy's error hook instead.
    """
    status = record.status
    if status is None or not 200 <= status < 300 or record.error is not None or record.token_name is None:
        return None
    if body is None or plan.max_age <= 0 or not complete:
        return None
    kept = tuple((name, headers[name]) for name in STORED_HEADERS if name in headers)
    entry = CacheEntry(plan.key, record.token_name, record.provider, record.model, status, kept, body, stream,
                       now, now + plan.max_age)
    return entry if entry.size <= max_bytes else None


@dataclass(frozen=True)
class Replay:
    """A hit as an HTTP answer: the stored status, headers and body, plus `x-metrion-cache: HIT` and `age`."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def replay(entry: CacheEntry, now: float) -> Replay:
    """The answer to a hit: a stream goes out as a chunked `text/event-stream`, other bodies with a length.

    The limit headers are added by the addon's responseheaders hook, as for every answer.
    """
    framing = ("transfer-encoding", "chunked") if entry.stream else ("content-length", str(len(entry.body)))
    age = str(max(0, int(now - entry.created_at)))
    fields = [*entry.headers, framing, (HEADER, Outcome.HIT.value), ("age", age)]
    encoded = tuple((name.encode(), value.encode("utf-8", "surrogateescape")) for name, value in fields)
    return Replay(entry.status, encoded, entry.body)


def outcome(plan: CachePlan) -> Outcome:
    """What a forwarded request tells its client: it was looked up and missed, or it refreshed the entry."""
    return Outcome.REFRESH if plan.mode is Mode.REFRESH else Outcome.MISS


def account(record: RequestRecord, told: Outcome | None, hit: CacheEntry | None) -> RequestRecord:
    """The row of a request that asked for the cache; `told` is the `x-metrion-cache` the client was sent.

    A hit has no tokens and costs nothing (`price_source` 'cache'), and `saved_usd` holds what the original
    request cost; a miss or refresh is an ordinary row that says so in `cache_status`; a request Metrion refused
    before it was looked up or forwarded was told nothing, and its `cache_status` stays NULL.
    """
    if hit is None:
        return dataclasses.replace(record, cache_status=told.value if told else None)
    return dataclasses.replace(
        record, model=hit.model or record.model, status=hit.status, stream=hit.stream, input_tokens=0, output_tokens=0,
        cache_read_tokens=0, cache_write_tokens=0, reasoning_tokens=0, total_tokens=0, usage_source="none",
        cost_usd=0.0, price_source=CACHE_PRICE_SOURCE, cached=True, saved_usd=hit.cost_usd,
        cache_status=Outcome.HIT.value,
    )


CACHE_PRICE_SOURCE = "cache"


class StreamRecorder:
    """Wraps a response's stream callable and keeps a copy of exactly the bytes the client received.

    Past `limit` bytes it stops copying (the reply is then too large to cache) but forwards everything.
    """

    def __init__(self, inner: Callable[[bytes], bytes | list[bytes]], limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        out = self._inner(data)
        if not self.overflowed:
            for part in [out] if isinstance(out, bytes) else out:
                self._size += len(part)
                self._parts.append(part)
            if self._size > self._limit:
                self.overflowed, self._parts = True, []
        return out

    @property
    def body(self) -> bytes | None:
        """What the client received, or None if it overflowed."""
        return None if self.overflowed else b"".join(self._parts)
