"""What the budgets' safe bound costs in refusals: requests refused that the budget would in fact have paid for.

Run `.venv/bin/python bench/budget_refusals.py [--no-write]` (about a minute): a real mitmdump with Metrion in front
of the mock provider; writes its table into RESULTS.md between markers.

For each request profile, the budget is set to exactly N times what one such request costs (measured first through
an unbudgeted token), so a meter that knew each cost in advance would admit exactly N. Requests are then sent one
after another on a budgeted token until Metrion refuses one; a refusal while the rows before it are still being
written (settlement rides in the writer's ~50 ms batches) is followed by the same request once they are written (a
client would not retry: the refusal says `x-should-retry: false`), until a refusal with every row written.
"Would have fit" = N - admitted. The burst row sends 200 requests at once against a budget of 50 requests, as
tests/test_e2e_budgets.py does, and counts how many of them the burst let through.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from harness import Proxy, base_config, token  # noqa: E402
from run import write_results_section  # noqa: E402

from metrion_addon.mock_provider import MockProvider, output_tokens, reply_text  # noqa: E402

OPEN = token(100)
PROMPT = ("Our customer asks whether the annual plan can be paused for two months while their team moves offices, "
          "and if so whether the paused months are added to the end of the term or refunded; they also want to "
          "know if the data export keeps working during the pause and whether the seats they removed last week "
          "come back automatically when the plan resumes. Draft a short, friendly answer in plain English.")
N = 100  # requests a budget is sized for


@dataclass(frozen=True)
class Profile:
    name: str
    provider: str  # "openai" (chat completions) or "anthropic" (messages)
    max_tokens: int | None  # None: not set; 0: exactly what the mock will answer with

    def body(self) -> dict:
        model = "gpt-4o" if self.provider == "openai" else "claude-sonnet-4-20250514"
        body: dict = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens or output_tokens(reply_text(body))
        return body

    @property
    def path(self) -> str:
        return "/api/proxy/openai/v1/chat/completions" if self.provider == "openai" else "/api/proxy/v1/messages"

    def headers(self, key: str) -> dict[str, str]:
        if self.provider == "anthropic":
            return {"x-api-key": key, "anthropic-version": "2023-06-01"}
        return {"authorization": f"Bearer {key}"}


PROFILES = [
    Profile("gpt-4o, max_tokens = the reply's length", "openai", 0),
    Profile("gpt-4o, max_tokens = 4 x the reply", "openai", 4 * output_tokens(reply_text(
        {"messages": [{"role": "user", "content": PROMPT}]}))),
    Profile("gpt-4o, max_tokens = 1024", "openai", 1024),
    Profile("gpt-4o, no max_tokens (16,384 reserved)", "openai", None),
    Profile("claude-sonnet-4, max_tokens = the reply's length", "anthropic", 0),
    Profile("claude-sonnet-4, max_tokens = 1024", "anthropic", 1024),
]


def written(db: Path, name: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM requests WHERE token_name = ?", (name,)).fetchone()[0]


def wait_written(db: Path, name: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while written(db, name) < n and time.monotonic() < deadline:
        time.sleep(0.02)


def row_costs(db: Path, name: str) -> list[float]:
    with sqlite3.connect(db) as conn:
        return [cost for (cost,) in conn.execute(
            "SELECT cost_usd FROM requests WHERE token_name = ? AND status = 200 ORDER BY id", (name,))]


def one_cost(proxy: Proxy, profile: Profile) -> float:
    response = httpx.post(f"{proxy.url}{profile.path}", json=profile.body(), headers=profile.headers(OPEN),
                          timeout=30)
    assert response.status_code == 200, response.text
    before = len(row_costs(proxy.db_path, "open"))
    wait_written(proxy.db_path, "open", before + 1)
    return row_costs(proxy.db_path, "open")[-1]


def sequential(proxy: Proxy, profile: Profile, name: str, key: str) -> dict[str, float]:
    admitted = transient = sent = 0
    first = None
    with httpx.Client(timeout=30) as client:
        while True:
            response = client.post(f"{proxy.url}{profile.path}", json=profile.body(), headers=profile.headers(key))
            sent += 1
            if response.status_code == 200:
                admitted += 1
                continue
            assert response.status_code == 429, response.text
            first = admitted if first is None else first
            wait_written(proxy.db_path, name, sent)  # every row so far written, so every admitted request settled
            again = client.post(f"{proxy.url}{profile.path}", json=profile.body(), headers=profile.headers(key))
            sent += 1
            if again.status_code != 200:
                break
            admitted += 1  # refused only while earlier requests' rows were still waiting for the writer
            transient += 1
    return {"admitted": admitted, "transient": transient, "first": first or 0}


async def _burst(url: str, profile: Profile, key: str, n: int) -> list[int]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n), timeout=60) as client:
        responses = await asyncio.gather(*[client.post(f"{url}{profile.path}", json=profile.body(),
                                                       headers=profile.headers(key)) for _ in range(n)])
    return [r.status_code for r in responses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args()
    started = time.monotonic()
    mock = MockProvider()
    mock.start()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config = base_config(mock.base_url, workdir / "metrion.db", rate_limit=1_000_000)
        config["plans"]["pro"] = {"monthly_requests": None}
        config["tokens"] = [{"name": "open", "token": OPEN, "plan": "pro",
                             "keys": {"openai": "k", "anthropic": "k"}}]
        proxy = Proxy(workdir, config).start()
        try:
            costs = {profile.name: one_cost(proxy, profile) for profile in PROFILES}
            burst = PROFILES[0]
            for n, profile in enumerate([*PROFILES, burst]):
                size = 50 if n == len(PROFILES) else N
                config["tokens"].append({"name": f"p{n}", "token": token(200 + n), "plan": "pro",
                                         "monthly_usd": size * costs[profile.name],
                                         "keys": {"openai": "k", "anthropic": "k"}})
            proxy.restart()
            rows = []
            for n, profile in enumerate(PROFILES):
                result = sequential(proxy, profile, f"p{n}", token(200 + n))
                reservation = reserved_usd(proxy, profile)
                rows.append((profile.name, costs[profile.name], reservation, N, result["first"], result["admitted"],
                             N - result["admitted"]))
            statuses = asyncio.run(_burst(proxy.url, burst, token(200 + len(PROFILES)), 200))
            through = statuses.count(200)
            rows.append((f"burst of 200 at once: {burst.name}", costs[burst.name], reserved_usd(proxy, burst), 50,
                         through, through, 50 - through))
        finally:
            proxy.stop()
            mock.stop()
    lines = [f"Command: `.venv/bin/python bench/budget_refusals.py` ({time.monotonic() - started:.0f} s). Budget of "
             f"each row = N x the measured cost of one request.", "",
             "| requests | cost of one | reserved for one | reserved / cost | N (budget fits) | "
             "admitted before the first refusal | admitted once rows are written | refused that would have fit |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | ${cost:.6f} | ${reserve:.6f} | {reserve / cost:.1f} | {fits} | {first} | {admitted} | "
              f"{lost} ({lost / fits:.0%}) |" for name, cost, reserve, fits, first, admitted, lost in rows]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results_section("budgets", text)


def reserved_usd(proxy: Proxy, profile: Profile) -> float:
    """What one such request reserves: the library's own bound, priced as the proxy prices it."""
    from metrion_addon.budgets import NANO, token_bound, token_rates
    from metrion_addon.clock import iso_utc
    from metrion_addon.config import BUILTIN_PRICE_IDS
    from metrion_addon.pricing import Pricer, context_window
    from metrion_addon.request_body import RequestBody
    from metrion_addon.routes import route_metrion_path

    body = profile.body()
    raw = httpx.Request("POST", "http://x", json=body).content
    route = route_metrion_path(profile.path, {"openai": "http://u/v1", "anthropic": "http://u/v1"})
    assert route is not None
    window = context_window(BUILTIN_PRICE_IDS, route.provider, body["model"])
    bound = token_bound(route, "POST", raw, RequestBody(body["model"], False, body), window)
    rates = token_rates(Pricer({}), route.provider, body["model"], iso_utc(time.time()))
    assert rates is not None and not hasattr(bound, "reason")
    return rates.nano_usd(bound) / NANO


if __name__ == "__main__":
    main()
