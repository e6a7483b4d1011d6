"""Tests for pricing: rows cost what genai-prices says, unknown models cost NULL, and config overrides win."""

from __future__ import annotations

from datetime import datetime

import pytest
from genai_prices import Usage, calc_price, data_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from metrion_addon.config import ModelPrice
from metrion_addon.pricing import CONFIG_SOURCE, GENAI_PRICES_SOURCE, Pricer, base_model, override_cost
from metrion_addon.store import RequestRecord

TS = "2026-11-24T20:32:29.123Z"


def record(provider: str, model: str | None, **tokens: int) -> RequestRecord:
    return RequestRecord(
        ts=TS, token_name="app", requester=None, provider=provider, model=model,
        path="/v1/chat/completions", method="POST", stream=False, status=200, **tokens,
    )


USAGE = {"input_tokens": 12_000, "cache_read_tokens": 3_000, "cache_write_tokens": 1_000, "output_tokens": 70}


@pytest.mark.parametrize(
    ("provider", "model", "provider_id", "tokens"),
    [
        ("anthropic", "claude-sonnet-4-5-20250929", "anthropic", USAGE),
        ("anthropic", "claude-3-5-haiku-latest", "anthropic", USAGE),
        ("openai", "gpt-4o", "openai", {**USAGE, "cache_write_tokens": 0}),
        ("openai", "gpt-4o-2024-08-06", "openai", {**USAGE, "cache_write_tokens": 0}),
        ("openai", "o3-mini", "openai", {"input_tokens": 500, "output_tokens": 4_000}),
        ("gemini", "gemini-2.5-flash", "google", {**USAGE, "cache_write_tokens": 0}),
        ("gemini", "gemini-2.5-pro", "google", {"input_tokens": 250_000, "output_tokens": 1_000}),
        ("mistral", "mistral-large-latest", "mistral", {"input_tokens": 2_000, "output_tokens": 300}),
        ("grok", "grok-4", "x-ai", {**USAGE, "cache_write_tokens": 0}),
    ],
)
def test_known_model_costs_what_genai_prices_calc_price_says(
    provider: str, model: str, provider_id: str, tokens: dict[str, int]
) -> None:
    expected = calc_price(
        Usage(**tokens), model, provider_id=provider_id, genai_request_timestamp=datetime.fromisoformat(TS)
    )

    cost, source = Pricer({})(record(provider, model, **tokens))

    assert cost == pytest.approx(float(expected.total_price), rel=1e-12)
    assert cost > 0
    assert source == GENAI_PRICES_SOURCE
    assert source.startswith("genai-prices 0.")


def test_dated_snapshot_costs_the_same_as_its_model() -> None:
    pricer = Pricer({})
    dated = pricer(record("openai", "gpt-4o-2024-08-06", **USAGE))

    assert dated == pricer(record("openai", "gpt-4o", **USAGE))


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "my-fine-tune-that-nobody-prices"),
        ("anthropic", "gpt-4o-not-a-claude"),
        ("openai", None),
        ("openai", ""),
        ("elsewhere", "gpt-4o"),
    ],
)
def test_unknown_or_missing_model_costs_null_not_zero(provider: str, model: str | None) -> None:
    row = record(provider, model, input_tokens=100, output_tokens=10)

    assert Pricer({})(row) == (None, None)
    assert row.input_tokens == 100  # pricing never touches the tokens


def test_unknown_model_is_looked_up_in_genai_prices_only_once(monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = data_snapshot.get_snapshot()
    calls: list[str] = []
    find = snapshot.find_provider_model

    def counting_find(model: str, *args: object) -> object:
        calls.append(model)
        return find(model, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot, "find_provider_model", counting_find)
    pricer = Pricer({})
    for _ in range(3):
        assert pricer(record("openai", "no-such-model", input_tokens=5)) == (None, None)

    assert calls == ["no-such-model"]


@settings(max_examples=150, deadline=None)
@given(
    case=st.sampled_from([("anthropic", "claude-sonnet-4-5-20250929", "anthropic"), ("openai", "gpt-4o", "openai"),
                          ("gemini", "gemini-2.5-pro", "google"), ("grok", "grok-4", "x-ai"),
                          ("mistral", "mistral-large-latest", "mistral")]),
    prompt=st.integers(0, 400_000), read=st.integers(0, 400_000), write=st.integers(0, 400_000),
    output=st.integers(0, 100_000),
)
def test_any_usage_costs_exactly_what_calc_price_says(case, prompt: int, read: int, write: int, output: int) -> None:
    provider, model, provider_id = case
    tokens = {"input_tokens": prompt + read + write, "cache_read_tokens": read, "cache_write_tokens": write,
              "output_tokens": output}
    expected = calc_price(Usage(**tokens), model, provider_id=provider_id,
                          genai_request_timestamp=datetime.fromisoformat(TS))
    assert Pricer({})(record(provider, model, **tokens))[0] == pytest.approx(float(expected.total_price), rel=1e-12)


def test_known_model_with_no_tokens_costs_zero_with_its_source() -> None:
    assert Pricer({})(record("openai", "gpt-4o")) == (0.0, GENAI_PRICES_SOURCE)


def test_more_cached_than_prompt_tokens_is_left_unpriced() -> None:
    assert Pricer({})(record("openai", "gpt-4o", input_tokens=10, cache_read_tokens=20)) == (None, None)


OVERRIDE = ModelPrice(input=2.0, output=8.0, cache_read=0.5, cache_write=2.5)


@pytest.mark.parametrize(
    ("model", "overrides"),
    [
        ("gpt-4o", {"gpt-4o": OVERRIDE}),
        ("gpt-4o-2024-08-06", {"gpt-4o": OVERRIDE}),
        ("claude-sonnet-4-20250514", {"claude-sonnet-4": OVERRIDE}),
        ("my-fine-tune", {"my-fine-tune": OVERRIDE}),
        ("gpt-4o-2024-08-06", {"gpt-4o-2024-08-06": OVERRIDE, "gpt-4o": ModelPrice(input=99.0, output=99.0)}),
    ],
)
def test_config_override_wins_over_genai_prices(model: str, overrides: dict[str, ModelPrice]) -> None:
    cost, source = Pricer(overrides)(record("openai", model, **USAGE))

    # 8,000 uncached × 2 + 3,000 read × 0.5 + 1,000 write × 2.5 + 70 out × 8, per million
    assert cost == pytest.approx((16_000 + 1_500 + 2_500 + 560) / 1e6)
    assert source == CONFIG_SOURCE


def test_override_cache_prices_default_to_the_input_price() -> None:
    price = ModelPrice(input=3.0, output=15.0)

    assert override_cost(price, record("openai", "m", **USAGE)) == pytest.approx((12_000 * 3 + 70 * 15) / 1e6)


@pytest.mark.parametrize(
    ("model", "base"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("gpt-4o", "gpt-4o"),
        ("gemini-2.5-flash", "gemini-2.5-flash"),
        ("mistral-large-2411", "mistral-large-2411"),
    ],
)
def test_only_a_trailing_date_stamp_is_removed_from_a_model_id(model: str, base: str) -> None:
    assert base_model(model) == base


def test_warm_prices_a_call_without_raising() -> None:
    Pricer({}).warm()
