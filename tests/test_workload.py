"""The demo's traffic plan: deterministic, shaped like a working week, and covering every kind of call."""

from __future__ import annotations

import random
import re
from collections import Counter
from datetime import UTC, datetime

import pytest

from metrion_addon import workload
from metrion_addon.workload import DAY, TEAMS, TOUR, Team

END = datetime(2026, 11, 25, 12, tzinfo=UTC).timestamp()  # a Wednesday
START = END - 28 * DAY
WEB = next(team for team in TEAMS if team.token == "web-app")


@pytest.fixture(scope="module")
def four_weeks() -> list[workload.Call]:
    return workload.history(7, START, END)


def test_history_is_the_same_for_the_same_seed_and_ordered_in_time(four_weeks: list[workload.Call]) -> None:
    again = workload.history(7, START, END)
    other = workload.history(8, START, END)

    assert again == four_weeks
    assert other != four_weeks
    assert [call.seq for call in four_weeks] == list(range(len(four_weeks)))
    times = [call.at for call in four_weeks]
    assert times == sorted(times)
    assert min(times) >= START and max(times) < END


def test_history_grows_over_the_weeks_and_follows_the_working_day(four_weeks: list[workload.Call]) -> None:
    first, last = (sum(1 for c in four_weeks if lo <= c.at < lo + 7 * DAY) for lo in (START, END - 7 * DAY))
    web = [datetime.fromtimestamp(c.at, UTC) for c in four_weeks if c.token == "web-app"]
    day = sum(1 for moment in web if 9 <= moment.hour < 20 and moment.weekday() < 5)
    night = sum(1 for moment in web if (moment.hour < 6 or moment.hour >= 23) and moment.weekday() < 5)

    assert last > 1.5 * first
    assert day > 10 * max(night, 1)


def test_history_uses_every_provider_token_and_api(four_weeks: list[workload.Call]) -> None:
    assert {c.provider for c in four_weeks} == {"anthropic", "openai", "gemini", "mistral", "grok"}
    assert {c.api for c in four_weeks} == {"chat", "messages", "responses", "embeddings", "native"}
    assert {c.token for c in four_weeks} == {team.token for team in TEAMS if team.per_hour}
    assert len({c.requester for c in four_weeks}) >= 8
    assert {True, False} <= {c.stream for c in four_weeks}
    assert not any(c.stream for c in four_weeks if c.api == "embeddings")


def test_the_hackathon_token_appears_only_in_its_last_days(four_weeks: list[workload.Call]) -> None:
    hackathon = [c.at for c in four_weeks if c.token == "hackathon"]

    assert hackathon and min(hackathon) >= END - 4 * DAY


@pytest.mark.parametrize(
    ("seq", "stream", "failure"),
    [(7, False, "error-500"), (119, True, "error-429"), (231, False, "error-400"), (43, True, "cut-after:2"),
     (43, False, "error-500"), (8, True, ""), (0, False, "")],
)
def test_failures_sit_at_fixed_places(seq: int, stream: bool, failure: str) -> None:
    assert workload.failure_for(seq, stream) == failure


def test_a_few_percent_of_history_fails(four_weeks: list[workload.Call]) -> None:
    failed = Counter(c.scenario.rsplit(",", 1)[-1] for c in four_weeks if "error" in c.scenario or "cut" in c.scenario)

    assert set(failed) >= {"error-500", "error-429", "error-400"}
    assert 0.02 < (failed.total() + sum(c.bad_token for c in four_weeks)) / len(four_weeks) < 0.07


def test_the_live_tour_covers_each_provider_each_failure_and_the_cached_and_reasoning_models() -> None:
    tour = workload.live(7, 100)

    assert [c.seq for c in tour] == list(range(100, 100 + len(TOUR)))
    assert all(c.at is None for c in tour)
    providers = {"anthropic", "openai", "gemini", "mistral", "grok"}
    assert {c.provider for c in tour if c.stream} == {c.provider for c in tour if not c.stream} == providers
    assert {(c.provider, c.cache) for c in tour if c.cache} == {("openai", True), ("anthropic", True)}
    assert all(c.system_words >= 1400 for c in tour if c.cache)  # long enough for OpenAI's 1,024-token minimum
    assert {"o3-mini", "grok-3-mini", "gemini-2.5-flash"} <= {c.model for c in tour}
    assert sum(c.bad_token for c in tour) == 1
    kinds = {c.scenario.rsplit(",", 1)[-1] for c in tour}
    assert {"error-500", "error-429", "cut-after:2"} <= kinds


def test_a_burst_is_quick_calls_from_one_token() -> None:
    ci = next(team for team in TEAMS if team.token == "ci-bot")

    calls = workload.burst(500, 80, ci)

    assert len(calls) == 80 and {c.token for c in calls} == {"ci-bot"}
    assert [c.seq for c in calls] == list(range(500, 580))
    assert all(float(c.scenario.removeprefix("slow-headers:")) < 0.2 for c in calls)


@pytest.mark.parametrize(
    ("model", "api", "stream", "shape"),
    [
        ("gpt-4o-mini", "chat", False, r"slow-headers:\d\.\d{3}"),
        ("claude-sonnet-4-20250514", "messages", True, r"slow-headers:\d\.\d{3},delay-events:\d+"),
        ("text-embedding-3-small", "embeddings", False, r"slow-headers:0\.\d{3}"),
    ],
)
def test_latency_is_drawn_around_the_models_typical_value(model: str, api: str, stream: bool, shape: str) -> None:
    rng = random.Random(1)
    waits = []
    for _ in range(400):
        text = workload.scenario(rng, model, api, stream, 1.0, "")
        assert re.fullmatch(shape, text)
        waits.append(float(text.split(",")[0].removeprefix("slow-headers:")))

    assert sorted(waits)[200] == pytest.approx(workload.base_latency(model, api), rel=0.15)
    assert max(waits) <= 6.0


@pytest.mark.parametrize(
    ("team", "moment", "level"),
    [
        (WEB, datetime(2026, 11, 25, 14, 30, tzinfo=UTC), 1.0),  # the middle of its working day
        (WEB, datetime(2026, 11, 25, 3, tzinfo=UTC), 0.03),  # outside its hours: a trickle
        (WEB, datetime(2026, 11, 29, 14, 30, tzinfo=UTC), 0.35),  # a Sunday
        (WEB, datetime(2026, 11, 25, 7, tzinfo=UTC), 0.5),  # its first hour
    ],
)
def test_activity_follows_the_working_day_and_week(team: Team, moment: datetime, level: float) -> None:
    assert workload.activity(team, moment) == pytest.approx(level, abs=0.01)


@pytest.mark.parametrize("mean", [0.05, 0.8, 3.0])
def test_poisson_draws_have_the_asked_mean(mean: float) -> None:
    rng = random.Random(3)
    draws = [workload.poisson(rng, mean) for _ in range(20000)]

    assert sum(draws) / len(draws) == pytest.approx(mean, rel=0.05)


def test_the_free_plan_cap_is_reached_by_this_months_calls(four_weeks: list[workload.Call]) -> None:
    november = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    this_month = sum(1 for c in four_weeks if c.token == "hackathon" and c.at >= november)

    assert workload.monthly_cap(four_weeks, "hackathon", END) == int(0.8 * this_month)
    assert workload.monthly_cap([], "hackathon", END) == 5
    assert workload.monthly_cap(four_weeks, "hackathon", END + 31 * DAY) == 5  # next month: none yet


def test_prompt_text_is_words_and_repeatable() -> None:
    assert workload.prompt_text(50, 3) == workload.prompt_text(50, 3)
    assert len(workload.prompt_text(50, 3).split()) == 50
    assert workload.prompt_text(0, 3) == ""
