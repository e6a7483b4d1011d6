"""The demo's traffic as plain data: which team calls which model, when, how fast, and how it goes wrong.

Pure functions of a seed and a time range; demo.py sends the calls through the real proxy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

HOUR = 3600.0
DAY = 24 * HOUR
BAD_TOKEN = "sk-metrion-" + "0" * 32  # a token no config knows: Metrion answers 401
UNPRICED = "ft:open-mistral-7b:acme:tickets"  # a fine-tune genai-prices has no price for: cost_usd NULL
_WORDS = (
    "invoice customer refund policy shipping order delay summary contract clause renewal forecast revenue quarter "
    "churn ticket escalation priority draft email translate german french table quarterly report risk audit "
    "compliance vendor onboarding checklist incident postmortem latency outage database migration schema index "
    "query cache review pull request test coverage release notes roadmap feature request pricing tier discount"
)
VOCABULARY = tuple(_WORDS.split())


@dataclass(frozen=True)
class Team:
    """A Metrion token and the people or jobs using it."""

    token: str  # the token's name
    plan: str
    stored: bool  # stored mode (the token is the API key) or pass-through (own provider key + x-metrion-token)
    requesters: tuple[str, ...]
    per_hour: float  # mean calls an hour at its busiest, on a weekday, by the end of the history
    hours: tuple[int, int]  # the UTC hours it works, [start, end)
    weekend: float  # weekend traffic as a share of a weekday's
    models: tuple[tuple[str, str, str, float], ...]  # (provider, api, model, weight); api: chat, messages, ...
    stream: float  # share of calls that stream
    cache: bool = False  # long shared prompts the provider caches
    since_days: float | None = None  # active only in the last days of the history


@dataclass(frozen=True)
class Call:
    """One SDK call the demo makes through Metrion."""

    seq: int
    at: float | None  # the proxy's clock (epoch seconds) when it is sent; None: now
    token: str  # the team's token name
    requester: str
    provider: str
    api: str  # chat, messages, responses, embeddings, or native (Gemini's own API, through google-genai)
    model: str
    stream: bool
    system_words: int
    user_words: int
    cache: bool
    scenario: str  # the mock's x-mock-scenario: its latency, and a failure if any
    bad_token: bool = False


TEAMS = (
    Team("web-app", "pro", True, ("alice", "bob", "carol", "dave"), 1.6, (7, 22), 0.35,
         (("openai", "chat", "gpt-4o", 3), ("openai", "chat", "gpt-4o-mini", 4),
          ("anthropic", "messages", "claude-sonnet-4-20250514", 3), ("gemini", "native", "gemini-2.5-flash", 2),
          ("mistral", "chat", "mistral-small-latest", 1), ("grok", "chat", "grok-3", 1)), 0.7),
    Team("support-bot", "pro", False, ("support-bot",), 1.0, (0, 24), 0.8,
         (("anthropic", "messages", "claude-3-5-haiku-20241022", 4),
          ("anthropic", "messages", "claude-sonnet-4-20250514", 1), ("openai", "responses", "gpt-4o-mini", 1),
          ("openai", "chat", "gpt-4o", 1)), 0.5, cache=True),
    Team("data-pipeline", "team", True, ("nightly-etl",), 5.0, (1, 4), 1.0,
         (("openai", "embeddings", "text-embedding-3-small", 3), ("mistral", "embeddings", "mistral-embed", 1),
          ("gemini", "chat", "gemini-2.0-flash", 2), ("mistral", "chat", "mistral-large-latest", 1)), 0.0),
    Team("research", "pro", False, ("erin", "frank"), 0.6, (9, 19), 0.1,
         (("openai", "chat", "o3-mini", 2), ("grok", "chat", "grok-3-mini", 2),
          ("gemini", "native", "gemini-2.5-pro", 1), ("anthropic", "messages", "claude-opus-4-1-20250805", 1),
          ("openai", "chat", "ft:gpt-4o-mini-2024-07-18:acme:tickets:x1", 1),
          ("mistral", "chat", UNPRICED, 1)), 0.5),
    Team("hackathon", "free", True, ("hack-team",), 3.0, (10, 23), 1.0,
         (("openai", "chat", "gpt-4o-mini", 3), ("grok", "chat", "grok-3-mini", 1),
          ("gemini", "chat", "gemini-2.0-flash", 2)), 0.6, since_days=4),
    Team("ci-bot", "team", True, ("ci",), 0.0, (0, 24), 1.0, (("openai", "chat", "gpt-4o-mini", 1),), 0.0),
)

# The live tour: one call of each kind, so the last minutes show every provider, API and failure at once.
TOUR: tuple[tuple[str, str, str, str, bool, bool, str], ...] = (
    # (team, provider, api, model, stream, cache, failure)
    ("web-app", "openai", "chat", "gpt-4o", True, False, ""),
    ("research", "openai", "chat", "o3-mini", False, False, ""),
    ("support-bot", "openai", "responses", "gpt-4o-mini", False, False, ""),
    ("support-bot", "openai", "chat", "gpt-4o", False, True, ""),
    ("data-pipeline", "openai", "embeddings", "text-embedding-3-small", False, False, ""),
    ("support-bot", "anthropic", "messages", "claude-sonnet-4-20250514", True, True, ""),
    ("web-app", "anthropic", "messages", "claude-3-5-haiku-20241022", False, False, ""),
    ("web-app", "gemini", "native", "gemini-2.5-flash", True, False, ""),
    ("research", "gemini", "native", "gemini-2.5-pro", False, False, ""),
    ("data-pipeline", "gemini", "chat", "gemini-2.0-flash", False, False, ""),
    ("web-app", "mistral", "chat", "mistral-large-latest", True, False, ""),
    ("data-pipeline", "mistral", "embeddings", "mistral-embed", False, False, ""),
    ("research", "grok", "chat", "grok-3-mini", False, False, ""),
    ("research", "mistral", "chat", UNPRICED, False, False, ""),
    ("web-app", "grok", "chat", "grok-3", True, False, ""),
    ("web-app", "openai", "chat", "gpt-4o-mini", False, False, "error-500"),
    ("support-bot", "anthropic", "messages", "claude-3-5-haiku-20241022", False, False, "error-429"),
    ("web-app", "grok", "chat", "grok-3", True, False, "cut-after:2"),
    ("web-app", "openai", "chat", "gpt-4o-mini", False, False, "bad-token"),
)


def base_latency(model: str, api: str) -> float:
    """Typical seconds to the first byte: embeddings are quick, reasoning and the largest models slow."""
    if api == "embeddings":
        return 0.08
    if model.startswith(("o3", "grok-3-mini", "gemini-2.5-pro", "claude-opus")):
        return 2.0
    if "mini" in model or "haiku" in model or "small" in model or "2.0-flash" in model:
        return 0.35
    return 0.7


def scenario(rng: random.Random, model: str, api: str, stream: bool, latency_scale: float, failure: str) -> str:
    """The mock's x-mock-scenario: a log-normal wait for the headers, paced stream events, and the failure."""
    wait = min(base_latency(model, api) * rng.lognormvariate(0, 0.4), 6.0) * latency_scale
    parts = [f"slow-headers:{wait:.3f}"]
    if stream:
        parts.append(f"delay-events:{max(1, round(rng.uniform(15, 45) * latency_scale))}")
    if failure:
        parts.append(failure)
    return ",".join(parts)


def failure_for(seq: int, stream: bool) -> str:
    """A few failures at fixed places, so that even a short run has each kind: 1 in 100 of each."""
    kind = {7: "error-500", 19: "error-429", 31: "error-400", 43: "cut-after:2" if stream else "error-500"}
    return kind.get(seq % 100, "")


def activity(team: Team, moment: datetime) -> float:
    """The team's share of its peak rate at this UTC hour: a bell over its working hours, a trickle outside."""
    start, end = team.hours
    hour = moment.hour + moment.minute / 60
    level = 0.5 + 0.5 * math.sin(math.pi * (hour - start) / (end - start)) if start <= hour < end else 0.03
    return level * (team.weekend if moment.weekday() >= 5 else 1.0)


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth's method; the means here are small)."""
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def words(rng: random.Random, median: float, low: int, high: int) -> int:
    return max(low, min(high, round(median * rng.lognormvariate(0, 0.6))))


def make_call(
    rng: random.Random, seq: int, at: float | None, team: Team, choice: tuple[str, str, str], stream: bool,
    cache: bool, failure: str, latency_scale: float,
) -> Call:
    provider, api, model = choice
    stream = stream and api != "embeddings"
    long_prompt = cache and api in ("chat", "messages", "responses")
    system = 0 if api == "embeddings" else words(rng, 1600, 1400, 2400) if long_prompt else words(rng, 60, 5, 400)
    user = words(rng, 250, 20, 1500) if api == "embeddings" else words(rng, 80, 5, 900)
    bad = failure == "bad-token"
    return Call(
        seq=seq, at=at, token=team.token, requester=rng.choice(team.requesters), provider=provider, api=api,
        model=model, stream=stream, system_words=system, user_words=user, cache=long_prompt,
        scenario=scenario(rng, model, api, stream, latency_scale, "" if bad else failure), bad_token=bad,
    )


def history(
    seed: int, start: float, end: float, teams: Iterable[Team] = TEAMS, scale: float = 1.0, latency_scale: float = 1.0
) -> list[Call]:
    """Calls from `start` to `end` (epoch seconds), hour by hour, growing over the period; ordered by time."""
    rng = random.Random(seed)
    drafts: list[tuple[float, Team]] = []
    hour = start - start % HOUR
    while hour < end:
        moment = datetime.fromtimestamp(hour, UTC)
        growth = 0.4 + 0.6 * (hour - start) / max(end - start, HOUR)
        for team in teams:
            if team.since_days is not None and hour < end - team.since_days * DAY:
                continue
            for _ in range(poisson(rng, team.per_hour * activity(team, moment) * growth * scale)):
                at = hour + rng.random() * HOUR
                if start <= at < end:
                    drafts.append((at, team))
        hour += HOUR
    drafts.sort(key=lambda draft: draft[0])
    calls = []
    for seq, (at, team) in enumerate(drafts):
        provider, api, model, _ = rng.choices(team.models, weights=[m[3] for m in team.models])[0]
        stream = rng.random() < team.stream
        failure = "bad-token" if team.stored and seq % 97 == 13 else failure_for(seq, stream)
        calls.append(make_call(rng, seq, at, team, (provider, api, model), stream, team.cache, failure, latency_scale))
    return calls


def live(seed: int, first_seq: int, teams: Iterable[Team] = TEAMS, latency_scale: float = 1.0) -> list[Call]:
    """The tour, sent now: every provider, streams and not, cached and reasoning tokens, and each failure."""
    rng = random.Random(seed + 1)
    by_name = {team.token: team for team in teams}
    return [
        make_call(rng, first_seq + i, None, by_name[name], (provider, api, model), stream, cache, failure,
                  latency_scale)
        for i, (name, provider, api, model, stream, cache, failure) in enumerate(TOUR)
    ]


def burst(first_seq: int, size: int, team: Team) -> list[Call]:
    """`size` quick calls at once from one token: more than its rate limit lets through."""
    rng = random.Random(first_seq)
    return [
        replace(make_call(rng, first_seq + i, None, team, team.models[0][:3], False, False, "", 0.05),
                user_words=12, system_words=0)
        for i in range(size)
    ]


def monthly_cap(calls: Iterable[Call], token: str, now: float, share: float = 0.8) -> int:
    """A cap the token reaches this month: `share` of the calls it makes this month (at least 5)."""
    month = datetime.fromtimestamp(now, UTC).strftime("%Y-%m")
    count = sum(
        1 for call in calls
        if call.token == token and datetime.fromtimestamp(call.at or now, UTC).strftime("%Y-%m") == month
    )
    return max(5, int(count * share))


def prompt_text(count: int, seed: int) -> str:
    """`count` words of plausible business text, the same for the same seed."""
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCABULARY) for _ in range(count))
