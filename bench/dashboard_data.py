"""Realistic request rows for the dashboard benchmark and the README screenshot: teams, apps and their models.

Each requester belongs to one token and uses a few models; traffic follows the working day; a few percent fail.
"""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta
from pathlib import Path

from metrion_addon import aggregates, store

MODELS = [  # (provider, model, input $/M, output $/M, median latency ms)
    ("openai", "gpt-4o", 2.5, 10.0, 1800),
    ("openai", "gpt-4o-mini", 0.15, 0.6, 700),
    ("openai", "o3-mini", 1.1, 4.4, 4200),
    ("anthropic", "claude-sonnet-4-5-20250929", 3.0, 15.0, 2600),
    ("anthropic", "claude-haiku-4-5-20251001", 1.0, 5.0, 900),
    ("gemini", "gemini-2.5-flash", 0.3, 2.5, 800),
    ("gemini", "gemini-2.5-pro", 1.25, 10.0, 3500),
    ("mistral", "mistral-large-latest", 2.0, 6.0, 1500),
    ("grok", "grok-4", 3.0, 15.0, 3000),
    ("openai", "ft:gpt-4o-mini:acme:support", 0.0, 0.0, 800),  # unpriced: cost_usd NULL
]
TOKENS = ["support-bot", "search", "ci-evals", "data-team", "invoice-bot", "playground"]
FAILURES = [  # (status, answered by Metrion, error) with weights per thousand requests
    (429, True, "rate limit: 100 requests a minute", 14),
    (401, True, "unknown Metrion token", 3),
    (504, True, "the provider did not answer within 30 s", 2),
    (500, False, "Internal server error", 7),
    (529, False, "Overloaded", 4),
    (400, False, "max_tokens: field required", 6),
    (None, False, "client disconnected mid-stream", 2),
]


def people(seed_value: int = 1) -> list[tuple[str, str, list[int]]]:
    """(requester, token, model indexes): each requester works through one token and prefers a few models."""
    rng = random.Random(seed_value)
    crew = []
    for i in range(36):
        token = TOKENS[min(int(rng.expovariate(0.6)), len(TOKENS) - 1)]
        models = sorted(rng.sample(range(len(MODELS)), rng.choice((1, 2, 2, 3))))
        crew.append((f"{token.split('-')[0]}-{i:02d}", token, models))
    return crew


def _ts(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rows(count: int, days: int, now: datetime, rng: random.Random) -> list[store.RequestRecord]:
    """`count` requests over the `days` before `now`, busier on weekdays and in working hours (UTC)."""
    crew = people()
    weights = [1.0 / (1 + i) for i in range(len(crew))]
    start = now - timedelta(days=days)
    records = []
    for _ in range(count):
        while True:  # rejection sampling for the daily and weekly rhythm
            moment = start + timedelta(seconds=rng.random() * days * 86400)
            hour = moment.hour + moment.minute / 60
            weight = (0.25 + math.exp(-((hour - 14) ** 2) / 18)) * (0.45 if moment.weekday() >= 5 else 1)
            if rng.random() < weight / 1.25:
                break
        requester, token, models = rng.choices(crew, weights)[0]
        provider, model, price_in, price_out, median = MODELS[rng.choice(models)]
        status, own, error = 200, False, None
        roll = rng.random() * 1000
        for code, metrion, message, per_mille in FAILURES:
            roll -= per_mille
            if roll < 0:
                status, own, error = code, metrion, message
                break
        ok = status == 200
        input_tokens = int(rng.lognormvariate(7, 1)) if not own else 0
        cache_read = input_tokens // 2 if ok and rng.random() < 0.3 else 0
        output_tokens = int(rng.lognormvariate(5.5, 0.9)) if ok else 0
        reasoning = output_tokens // 3 if ok and model.startswith(("o3", "gemini-2.5-pro")) else 0
        cost = (input_tokens * price_in + output_tokens * price_out) / 1e6 if price_in and not own else None
        latency = rng.uniform(0.3, 3) if own else median * rng.lognormvariate(0, 0.45)
        records.append(store.RequestRecord(
            ts=_ts(moment), token_name=token if status != 401 else None, requester=requester, provider=provider,
            model=model, requested_model=model, path="/v1/chat/completions", method="POST",
            stream=rng.random() < 0.6, status=status,
            input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cache_read,
            reasoning_tokens=reasoning, total_tokens=input_tokens + output_tokens, latency_ms=latency,
            ttfb_ms=None if own else latency * rng.uniform(0.05, 0.4),
            usage_source="provider" if ok else "none", error=error, auth_mode="stored", cost_usd=cost,
            price_source="bench" if cost is not None else None,
        ))
    records.sort(key=lambda record: record.ts)
    return records


def seed(path: Path, count: int, days: int, now: datetime, seed_value: int = 7, chunk: int = 50_000) -> None:
    """Write the rows and their aggregates as the writer does (the same function, in the same transaction)."""
    conn = store.connect(path)
    store.create_schema(conn)
    rng = random.Random(seed_value)
    columns = ", ".join(store.COLUMNS)
    marks = ", ".join("?" * len(store.COLUMNS))
    for done in range(0, count, chunk):
        batch = rows(min(chunk, count - done), days, now, rng)
        with conn:
            conn.execute("BEGIN")
            conn.executemany(f"INSERT INTO requests ({columns}) VALUES ({marks})",
                             [[getattr(r, name) for name in store.COLUMNS] for r in batch])
            aggregates.add_to_hourly(conn, batch)
    conn.execute("INSERT INTO monthly_usage (token_name, month, requests) VALUES ('support-bot', ?, 6100)",
                 (now.strftime("%Y-%m"),))
    conn.close()
