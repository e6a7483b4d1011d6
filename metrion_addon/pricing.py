"""What a request cost: genai-prices' bundled (offline) data, overridden per model by the YAML's `prices:`.

Runs on the store's writer thread; each row gets (cost_usd, price_source) so old rows can be re-priced later.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
from genai_prices import Usage, calc_price, data_snapshot
from genai_prices import types as genai_types

from metrion_addon.config import BUILTIN_PRICE_IDS, ModelPrice
from metrion_addon.store import RequestRecord

log = logging.getLogger(__name__)
CONFIG_SOURCE = "config"
GENAI_PRICES_SOURCE = f"genai-prices {genai_prices.__version__}"
_DATE_STAMP = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")


def base_model(model: str) -> str:
    """The model id without a trailing date stamp: `gpt-4o-2024-08-06` and `gpt-4o-20240806` are `gpt-4o`."""
    return _DATE_STAMP.sub("", model)


def override_cost(price: ModelPrice, record: RequestRecord) -> float:
    """USD for the row at a per-million-token config price; cache prices default to the input price."""
    uncached = record.input_tokens - record.cache_read_tokens - record.cache_write_tokens
    cache_read = price.input if price.cache_read is None else price.cache_read
    cache_write = price.input if price.cache_write is None else price.cache_write
    micro_usd = (
        uncached * price.input
        + record.cache_read_tokens * cache_read
        + record.cache_write_tokens * cache_write
        + record.output_tokens * price.output
    )
    return micro_usd / 1_000_000


def _request_time(ts: str) -> datetime | None:
    try:
        return datetime.fromisoformat(ts)
    except ValueError:
        return None  # genai-prices then uses today's prices


_MTOK = 1_000_000


def _linear_rates(price: genai_types.ModelPrice) -> tuple[Decimal, ...] | None:
    """genai-prices' own cost for a fixed fee and one million tokens of each kind, or None if it is tiered.

    Without tiers the cost is affine in the four token counts, so these five numbers reproduce `calc_price`
    exactly (in Decimal) at a fraction of its cost; tiered prices depend on the prompt size and go the slow way.
    """
    if any(isinstance(value, genai_types.TieredPrices) for value in vars(price).values()):
        return None

    def cost(input: int = 0, cache_read: int = 0, cache_write: int = 0, output: int = 0) -> Decimal:
        usage = Usage(input_tokens=input, cache_read_tokens=cache_read, cache_write_tokens=cache_write,
                      output_tokens=output)
        return price.calc_price(usage)["total_price"]

    fee, prompt = cost(), cost(input=_MTOK)
    return fee, prompt - fee, cost(_MTOK, cache_read=_MTOK) - prompt, cost(_MTOK, cache_write=_MTOK) - prompt, \
        cost(output=_MTOK) - fee


class Pricer:
    """Prices rows: a config override for the model wins, else genai-prices; unknown models cost NULL.

    `price_ids` maps each provider to its genai-prices provider id (None: only overrides price it).
    """

    def __init__(self, overrides: Mapping[str, ModelPrice], price_ids: Mapping[str, str | None] | None = None) -> None:
        self._overrides = dict(overrides)
        self._price_ids = dict(BUILTIN_PRICE_IDS if price_ids is None else price_ids)
        self._unknown: set[tuple[str, str]] = set()  # a miss scans every model in genai-prices: remember it
        self._rates: dict[int, tuple[genai_types.ModelPrice, tuple[Decimal, ...] | None]] = {}

    def warm(self) -> None:
        """Load the price data now, so the first real row is not the one that pays for it."""
        calc_price(Usage(input_tokens=1, output_tokens=1), "gpt-4o", provider_id="openai")

    def __call__(self, record: RequestRecord) -> tuple[float | None, str | None]:
        model = record.model.removeprefix("models/") if record.model else None  # Gemini's own id form
        if not model or record.cache_read_tokens + record.cache_write_tokens > record.input_tokens:
            return None, None  # no model, or inconsistent counts: an unknown cost beats a wrong one
        override = self._overrides.get(model) or self._overrides.get(base_model(model))
        if override is not None:
            return override_cost(override, record), CONFIG_SOURCE
        provider_id = self._price_ids.get(record.provider)
        if provider_id is None or (provider_id, model) in self._unknown:
            return None, None
        when = _request_time(record.ts)
        try:
            _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
        except LookupError:
            self._unknown.add((provider_id, model))
            return None, None
        try:
            return self._genai_cost(info, record, when), GENAI_PRICES_SOURCE
        except Exception:  # the writer thread must never die over a price: store the row unpriced
            log.exception("metrion: could not price %s %s", record.provider, model)
            return None, None

    def _genai_cost(self, info: genai_types.ModelInfo, record: RequestRecord, when: datetime | None) -> float:
        price = info.get_prices(when or datetime.now(UTC))
        cached = self._rates.get(id(price))
        if cached is None or cached[0] is not price:
            cached = self._rates[id(price)] = (price, _linear_rates(price))
        rates = cached[1]
        if rates is None:
            usage = Usage(input_tokens=record.input_tokens, cache_read_tokens=record.cache_read_tokens,
                          cache_write_tokens=record.cache_write_tokens, output_tokens=record.output_tokens)
            return float(price.calc_price(usage)["total_price"])
        fee, prompt, cache_read, cache_write, output = rates
        tokens = (prompt * record.input_tokens + cache_read * record.cache_read_tokens
                  + cache_write * record.cache_write_tokens + output * record.output_tokens)
        return float(fee + tokens / _MTOK)


def context_window(price_ids: Mapping[str, str | None], provider: str, model: str) -> int | None:
    """The model's context window in tokens per genai-prices (no output can be longer), or None if unknown."""
    provider_id = price_ids.get(provider)
    if provider_id is None:
        return None
    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(model.removeprefix("models/"), None, provider_id,
                                                                   None)
    except LookupError:
        return None
    return info.context_window
