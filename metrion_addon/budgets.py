"""Monthly dollar budgets that never overshoot: bound a request's cost from its body, reserve it, settle it.

Pure decisions (token bounds, the price of a bound, settlement); the counters sit behind BudgetCounters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .clock import iso_utc
from .errors import MetrionError
from .limits import CalendarMonth
from .request_body import RequestBody
from .routes import Route
from .store import BudgetState, RequestRecord

log = logging.getLogger(__name__)

NANO = 1_000_000_000  # counters hold integer nano-dollars: sums stay exact across restarts
FREE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
FREE_ENDPOINTS = frozenset({"messages/count_tokens", "models"})
FREE_GEMINI_METHODS = frozenset({"countTokens"})

# Documented maximum input tokens one image can cost (per provider; per model where a family differs).
IMAGE_TOKENS = {
    "anthropic": 1_600,  # images over ~1,600 tokens (1.15 megapixels) are scaled down first
    "openai": 3_779,  # 1,536 patches x 2.46 (gpt-4.1-nano); gpt-4o and o-series: 85 + 170 x 8 tiles = 1,445
    "gemini": 4_128,  # 258 tokens per 768x768 tile, 16 tiles
    "mistral": 4_161,  # Pixtral: 1024x1024 in 16x16 patches (4,096) + 64 row breaks + 1 end
    "grok": 1_792,  # 6 tiles of 448x448 at 256 tokens, plus one
}
_MOST_IMAGE_TOKENS = max(IMAGE_TOKENS.values())  # for a configured provider whose models Metrion does not know
IMAGE_TOKENS_BY_MODEL = {("openai", "gpt-4o-mini"): 48_169}  # 2,833 + 5,667 x 8 tiles
TOOL_TOKENS = 1_000  # the hidden system text a provider adds when tools are declared (Anthropic: up to 346)
CLIENT_TOOL_TYPES = frozenset({"function", "custom"})
ANTHROPIC_CLIENT_TOOLS = ("bash_", "text_editor_", "computer_", "custom")  # run by the client: no hidden input
IMAGE_PARTS = frozenset({"image", "image_url", "input_image"})
UNBOUNDED_PARTS = frozenset(
    {"document", "file", "input_file", "input_audio", "audio", "video", "video_url", "document_url",
     "container_upload"}
)
# A body without any of these bytes has no image or unbounded part, so the walk is skipped (a \u escape could
# spell a part type without its bytes, so it forces the walk too).
_PART_HINTS = (b"image", b"file", b"audio", b"video", b"document", b"container_upload", b"inline", b"\\u")
_GEMINI_MEDIA = ("inlineData", "inline_data", "fileData", "file_data")  # Gemini's native parts carry a MIME type
_GEMINI_CLIENT_TOOLS = frozenset({"functionDeclarations", "function_declarations"})
UNSEEN_INPUT_KEYS = {  # request fields that pull in input stored at the provider, which the body does not show
    "responses": ("previous_response_id", "conversation", "prompt"),
    "messages": ("mcp_servers", "container"),
    "generate": ("cachedContent", "cached_content"),
}
_MAX_OUTPUT_KEYS = {"messages": ("max_tokens",), "responses": ("max_output_tokens",),
                    "generate": ("maxOutputTokens", "max_output_tokens")}
# Documented maximum output tokens, used when a request sets no maximum (longest matching prefix wins).
OUTPUT_LIMITS = {
    "openai": {"gpt-4o": 16_384, "gpt-4.1": 32_768, "gpt-4-turbo": 4_096, "gpt-3.5-turbo": 4_096,
               "o1": 100_000, "o3": 100_000, "o4": 100_000, "gpt-5": 128_000},
    "gemini": {"gemini-2.5": 65_536, "gemini-2.0": 8_192, "gemini-1.5": 8_192},
}


@dataclass(frozen=True)
class TokenBound:
    """The most tokens a request can be billed for: every prompt token it can carry, and every output token."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Unbounded:
    """Why a request's cost cannot be bounded from its body."""

    reason: str


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _string_bytes(node: object) -> int:
    """Characters in every string under `node` (an image's URL or base64 data is not prompt text)."""
    total, stack = 0, [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def _parts(parsed: Mapping) -> tuple[int, int, str | None]:
    """(images, characters inside them, the first part type Metrion cannot bound) over everything but tools."""
    images = image_chars = 0
    stack: list[object] = [value for key, value in parsed.items() if key not in ("tools", "response_format")]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            kind = item.get("type")
            media = next((item[key] for key in _GEMINI_MEDIA if isinstance(item.get(key), dict)), None)
            if media is not None:
                mime = media.get("mimeType") or media.get("mime_type")
                kind = "image" if isinstance(mime, str) and mime.startswith("image/") else f"{mime}"
            if kind in IMAGE_PARTS:
                images += 1
                image_chars += _string_bytes(item)
                continue
            if kind in UNBOUNDED_PARTS or media is not None:
                return images, image_chars, kind
            stack.extend(value for value in item.values() if isinstance(value, list | dict))
    return images, image_chars, None


def _tools(route: Route, tools: object) -> Unbounded | bool:
    """Whether the request declares tools, or why its tools make the input unbounded (server-side tools)."""
    if not isinstance(tools, list) or not tools:
        return False
    for tool in tools:
        if route.format == "gemini":
            kind = next((key for key in tool if key not in _GEMINI_CLIENT_TOOLS), None) if isinstance(tool, dict) \
                else "?"
        else:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind in CLIENT_TOOL_TYPES or (route.format == "anthropic" and isinstance(kind, str)
                                             and kind.startswith(ANTHROPIC_CLIENT_TOOLS)):
                kind = None
        if kind is not None:
            return Unbounded(f"the server-side tool {kind!r} adds input (results, searches) the request does not show")
    return True


def output_limit(provider: str, model: str, context_window: int | None) -> int | None:
    """The model's documented output limit, else its context window (output can never exceed it), else None."""
    limits = OUTPUT_LIMITS.get(provider, {})
    for prefix in sorted(limits, key=len, reverse=True):
        if model.startswith(prefix):
            return limits[prefix]
    return context_window


def token_bound(route: Route, method: str, body: bytes, request: RequestBody | None,
                context_window: int | None) -> TokenBound | Unbounded:
    """A safe upper bound on the tokens a request can be billed for, derived from its body alone.

    Input: byte-level tokenizers never make more tokens than the UTF-8 bytes they read, and the JSON body holds
    every prompt byte plus its syntax (which outweighs each message's template tokens); images count their
    documented maximum instead of their URL or data, and declared tools add TOOL_TOKENS of hidden system text.
    Output: the request's own maximum (times `n` choices), else the model's output limit.
    """
    if method in FREE_METHODS or route.endpoint in FREE_ENDPOINTS or route.gemini_method in FREE_GEMINI_METHODS:
        return TokenBound(0, 0)
    if route.api == "other":
        return Unbounded(f"Metrion cannot bound what the {route.endpoint!r} endpoint costs")
    parsed = request.parsed if request else None
    model = (request.model if request else None) or route.model
    if parsed is None or not model:
        return Unbounded("the request names no model")
    for key in UNSEEN_INPUT_KEYS.get(route.api, ()):
        if parsed.get(key) is not None:
            return Unbounded(f"{key!r} adds input stored at the provider, which the request does not show")
    tools = _tools(route, parsed.get("tools"))
    if isinstance(tools, Unbounded):
        return tools
    hinted = any(hint in body for hint in _PART_HINTS)
    images, image_chars, unbounded = _parts(parsed) if hinted else (0, 0, None)
    if unbounded is not None:
        return Unbounded(f"a {unbounded!r} part costs tokens the request body does not bound")
    model = model.removeprefix("models/")
    input_tokens = max(0, len(body) - image_chars) + (TOOL_TOKENS if tools else 0)
    if images:
        per_image = next((tokens for (provider, prefix), tokens in IMAGE_TOKENS_BY_MODEL.items()
                          if provider == route.provider and model.startswith(prefix)),
                         IMAGE_TOKENS.get(route.provider, _MOST_IMAGE_TOKENS))
        input_tokens += images * per_image
    if route.api == "embeddings":
        return TokenBound(input_tokens, 0)
    settings, choices = parsed, parsed.get("n") if route.api == "chat" else None
    if route.api == "generate":
        settings = parsed.get("generationConfig") or parsed.get("generation_config")
        settings = settings if isinstance(settings, dict) else {}
        choices = settings.get("candidateCount") or settings.get("candidate_count")
    output = None
    if route.provider != "grok":  # xAI reports reasoning beside completion tokens and does not say max_tokens caps it
        for key in _MAX_OUTPUT_KEYS.get(route.api, ("max_completion_tokens", "max_tokens")):
            if (output := _positive_int(settings.get(key))) is not None:
                break
    if output is None:
        output = output_limit(route.provider, model, context_window)
    if output is None:
        return Unbounded(f"the request sets no maximum output and Metrion knows no output limit for {model!r}")
    return TokenBound(input_tokens, output * (_positive_int(choices) or 1))


@dataclass(frozen=True)
class TokenRates:
    """USD per request and per token, the highest any split of the prompt (cached, cache-written) can cost."""

    fee: float
    input: float
    output: float

    def nano_usd(self, bound: TokenBound) -> int:
        usd = self.fee + self.input * bound.input_tokens + self.output * bound.output_tokens
        return math.ceil(usd * NANO) + 1  # + 1: never below the row's own float cost


_SAMPLE = 10_000_000  # tokens: above every long-context tier, so tiered prices give their highest rate


def token_rates(price: Callable[[RequestRecord], tuple[float | None, str | None]], provider: str, model: str,
                ts: str) -> TokenRates | None:
    """Per-token rates read off the row pricer itself (the same prices as the row), or None if the model is unpriced.

    Linear prices give exact rates; a long-context tier is charged at its highest rate, an upper bound.
    """

    def cost(input_tokens: int = 0, output_tokens: int = 0, cache_read: int = 0, cache_write: int = 0) -> float | None:
        record = RequestRecord(ts=ts, token_name=None, requester=None, provider=provider, model=model, path="",
                               method="POST", stream=False, status=200, input_tokens=input_tokens,
                               output_tokens=output_tokens, cache_read_tokens=cache_read,
                               cache_write_tokens=cache_write)
        return price(record)[0]

    fee, prompt = cost(), cost(_SAMPLE)
    read, written, both = cost(_SAMPLE, cache_read=_SAMPLE), cost(_SAMPLE, cache_write=_SAMPLE), cost(_SAMPLE, _SAMPLE)
    if fee is None or prompt is None or read is None or written is None or both is None:
        return None
    return TokenRates(fee, (max(prompt, read, written) - fee) / _SAMPLE, (both - prompt) / _SAMPLE)


# --- the counters


@dataclass(frozen=True)
class Reservation:
    token_name: str
    month: str
    amount: int  # nano-USD
    id: str = ""  # names the reservation where settling it must count once (Redis)


class SettlingCounters(Protocol):
    """Counters that settle and report; reservations are made elsewhere (on Redis, with the limits)."""

    def settle(self, reservation: Reservation, actual: int | None) -> BudgetState | None: ...

    def state(self, token_name: str, month: str) -> BudgetState: ...


class BudgetCounters(Protocol):
    """Spent and reserved nano-dollars per (token, month). Each call is atomic; another backend keeps its meaning."""

    def reserve(self, token_name: str, month: str, amount: int, limit: int) -> tuple[bool, BudgetState]:
        """Reserve `amount` if spent + reserved + amount <= limit; (reserved?, the state after)."""

    def settle(self, reservation: Reservation, actual: int | None) -> BudgetState:
        """Replace the reservation by `actual`, now spent; None keeps the reservation, reserved for good."""

    def state(self, token_name: str, month: str) -> BudgetState:
        """The current state (zeros if nothing was ever reserved)."""


class MemoryBudgetCounters:
    """BudgetCounters in this process, behind a lock (the event loop reserves, the writer thread settles).

    Every change returns a versioned BudgetState for the store, so a later snapshot always wins there.
    """

    def __init__(self, saved: Iterable[BudgetState] = ()) -> None:
        self._lock = threading.Lock()
        self._states = {(s.token_name, s.month): s for s in saved}
        self._version = max((s.version for s in self._states.values()), default=0)

    def _put(self, token_name: str, month: str, spent: int, reserved: int) -> BudgetState:
        self._version += 1
        state = self._states[(token_name, month)] = BudgetState(token_name, month, spent, reserved, self._version)
        return state

    def reserve(self, token_name: str, month: str, amount: int, limit: int) -> tuple[bool, BudgetState]:
        with self._lock:
            now = self._states.get((token_name, month)) or BudgetState(token_name, month, 0, 0, 0)
            if now.spent_nanousd + now.reserved_nanousd + amount > limit:
                return False, now
            return True, self._put(token_name, month, now.spent_nanousd, now.reserved_nanousd + amount)

    def settle(self, reservation: Reservation, actual: int | None) -> BudgetState:
        with self._lock:
            key = (reservation.token_name, reservation.month)
            now = self._states.get(key) or BudgetState(*key, 0, 0, 0)
            if actual is None:
                return now
            reserved = max(0, now.reserved_nanousd - reservation.amount)
            return self._put(*key, now.spent_nanousd + actual, reserved)

    def state(self, token_name: str, month: str) -> BudgetState:
        with self._lock:
            return self._states.get((token_name, month)) or BudgetState(token_name, month, 0, 0, 0)


# --- decisions


@dataclass(frozen=True)
class TokenBudget:
    limit: int  # nano-USD per calendar month (UTC)
    unpriced: str  # "refuse" | "allow"


@dataclass(frozen=True)
class Ask:
    """A reservation to make: `amount` nano-USD of `budget` in `month`, for a request bounded by `bound`."""

    budget: TokenBudget
    month: str
    bound: TokenBound
    amount: int


@dataclass(frozen=True)
class Hold:
    """An admitted request's reservation (None: nothing reserved), its response headers and the state to store."""

    reservation: Reservation | None
    headers: dict[str, str]
    saved: BudgetState | None


def usd(nano: int) -> str:
    """Nano-dollars as a USD amount, rounded down to the micro-dollar (a header never overstates what is left)."""
    micro = max(0, nano) // 1000
    return f"{micro // 1_000_000}.{micro % 1_000_000:06d}"


def needs_disk(hold: Hold | None) -> bool:
    """Whether the request must wait for its reservation to be committed before it is forwarded: from the moment
    the provider sees it, a crash of Metrion must keep the reservation (the provider may bill the request)."""
    return hold is not None and hold.saved is not None and hold.reservation is not None and hold.reservation.amount > 0


SETTLING_WAIT = 1.0  # seconds a would-be refusal waits for the token's finished requests to settle, then asks again
COMMIT_WAIT = 10.0  # seconds a reservation may wait for its commit; then the request is refused (503), not forwarded


def budget_headers(limit: int, state: BudgetState) -> dict[str, str]:
    return {
        "x-metrion-budget-limit-usd": usd(limit),
        "x-metrion-budget-remaining-usd": usd(limit - state.spent_nanousd - state.reserved_nanousd),
    }


def amount_to_reserve(name: str, budget: TokenBudget, bound: TokenBound | Unbounded, rates: TokenRates | None,
                      model: str | None) -> int | None:
    """Nano-USD to reserve for a request; None when its cost cannot be bounded and the token allows that;
    raise MetrionError(403) when it cannot be bounded and the token refuses that."""
    if isinstance(bound, Unbounded) or (rates is None and bound != TokenBound(0, 0)):
        why = bound.reason if isinstance(bound, Unbounded) else f"Metrion knows no price for model {model!r}"
        if budget.unpriced == "allow":
            return None
        raise MetrionError(403, "budget_unbounded", (
            f"Metrion token '{name}' has a monthly budget of ${usd(budget.limit)}, and this request's cost cannot be "
            f"bounded: {why}. The config says unpriced: refuse for this token."
        ), {"x-should-retry": "false"})
    return rates.nano_usd(bound) if rates is not None else 0


def held(reservation: Reservation, budget: TokenBudget, bound: TokenBound, reserved: bool, state: BudgetState
         ) -> Hold:
    """The hold of a reservation the counters granted, or raise 429 budget_exceeded if they did not."""
    headers = budget_headers(budget.limit, state)
    if not reserved:
        left = headers["x-metrion-budget-remaining-usd"]
        raise MetrionError(429, "budget_exceeded", (
            f"Monthly budget reached for Metrion token '{reservation.token_name}': this request could cost up to "
            f"${usd(reservation.amount)} ({bound.input_tokens} input and {bound.output_tokens} output tokens at "
            f"most), and ${left} of ${usd(budget.limit)} is left (spent ${usd(state.spent_nanousd)}, reserved for "
            f"requests in flight ${usd(state.reserved_nanousd)}). The budget resets at the start of next month (UTC)."
        ), {"x-should-retry": "false", **headers})
    return Hold(reservation, headers, state)


def admit(counters: BudgetCounters, name: str, month: str, budget: TokenBudget,
          bound: TokenBound | Unbounded, rates: TokenRates | None, model: str | None) -> Hold:
    """Reserve the request's bound against the token's budget, or raise MetrionError saying why not."""
    amount = amount_to_reserve(name, budget, bound, rates, model)
    if amount is None:
        return Hold(None, budget_headers(budget.limit, counters.state(name, month)), None)
    assert isinstance(bound, TokenBound)
    reserved, state = counters.reserve(name, month, amount, budget.limit)
    return held(Reservation(name, month, amount), budget, bound, reserved, state)


def actual_cost(record: RequestRecord, complete: bool) -> int | None:
    """What a finished request settles at: its priced cost when the provider reported usage (or answered in full
    without any), else None: a cut stream, a timeout or a shutdown keeps the reservation."""
    if record.cost_usd is None:
        return None
    if record.usage_source == "provider" or (complete and record.usage_source == "none"):
        return math.ceil(record.cost_usd * NANO)
    return None


def nano_usd(amount_usd: float) -> int:
    return math.floor(amount_usd * NANO)


PriceFn = Callable[[RequestRecord], tuple[float | None, str | None]]
_CACHE_SIZE = 4096  # models are named by clients: keep the per-model cache bounded


class Budgets:
    """Every budgeted token's reservations: admitted on the event loop, settled on the writer thread.

    Rates and context windows are looked up once per model and UTC day, so a bound costs microseconds.
    """

    def __init__(self, budgets: Mapping[str, TokenBudget], counters: BudgetCounters | SettlingCounters, price: PriceFn,
                 context_window: Callable[[str, str], int | None]) -> None:
        self.budgets = dict(budgets)
        self.counters = counters
        self._price = price
        self._context_window = context_window
        self._models: dict[tuple[str, str, str], tuple[TokenRates | None, int | None]] = {}
        self._pending: dict[str, tuple[Reservation, bool | None]] = {}  # flow id -> (reservation, complete?)
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # refusals waiting for a settle
        self._settlements: dict[str, int] = {}  # token -> reservations settled so far (see settling())
        self._lock = threading.Lock()
        self._month = CalendarMonth()

    def reconfigure(self, budgets: Mapping[str, TokenBudget], price: PriceFn,
                    context_window: Callable[[str, str], int | None]) -> None:
        """New budgets and prices from a reloaded config; reservations in flight and the counters stay."""
        with self._lock:
            self.budgets = dict(budgets)
            self._price = price
            self._context_window = context_window
            self._models = {}

    def _model(self, provider: str, model: str, ts: str) -> tuple[TokenRates | None, int | None]:
        key = (provider, model, ts[:10])
        known = self._models.get(key)
        if known is None:
            if len(self._models) >= _CACHE_SIZE:
                self._models.clear()
            known = self._models[key] = (token_rates(self._price, provider, model, ts),
                                         self._context_window(provider, model))
        return known

    def _ask(self, name: str, now: float, route: Route, method: str, body: bytes, request: RequestBody | None
             ) -> tuple[TokenBudget, str, TokenBound | Unbounded, TokenRates | None, str | None] | None:
        budget = self.budgets.get(name)
        if budget is None:
            return None
        model = request.model if request else None
        rates, window = self._model(route.provider, model, iso_utc(now)) if model else (None, None)
        return budget, self._month(now)[0], token_bound(route, method, body, request, window), rates, model

    def admit(self, name: str, now: float, route: Route, method: str, body: bytes,
              request: RequestBody | None) -> Hold | None:
        """Reserve what the request can cost (None: the token has no budget); raise MetrionError to refuse it."""
        if (ask := self._ask(name, now, route, method, body, request)) is None:
            return None
        budget, month, bound, rates, model = ask
        assert hasattr(self.counters, "reserve"), "counters on Redis reserve with the limits (shared_budgets.py)"
        return admit(self.counters, name, month, budget, bound, rates, model)

    def ask(self, name: str, now: float, route: Route, method: str, body: bytes, request: RequestBody | None
            ) -> Ask | Hold | None:
        """What to reserve for a request on counters kept elsewhere (Redis): None if the token has no budget, a Hold
        with nothing reserved if its cost cannot be bounded and that is allowed; raise MetrionError(403) if not."""
        if (found := self._ask(name, now, route, method, body, request)) is None:
            return None
        budget, month, bound, rates, model = found
        amount = amount_to_reserve(name, budget, bound, rates, model)
        if amount is None:
            return Hold(None, budget_headers(budget.limit, self.counters.state(name, month)), None)
        assert isinstance(bound, TokenBound)
        return Ask(budget, month, bound, amount)

    def track(self, flow_id: str, hold: Hold) -> None:
        if hold.reservation is not None:
            with self._lock:
                self._pending[flow_id] = (hold.reservation, None)

    def release(self, hold: Hold) -> BudgetState | None:
        """Give a reservation back whole: the request was refused after all, nothing reached the provider."""
        return None if hold.reservation is None else self.counters.settle(hold.reservation, 0)

    def finish(self, flow_id: str | None, complete: bool) -> None:
        """The request is over (`complete`: the provider's whole answer arrived); its row settles it."""
        if flow_id is None or flow_id not in self._pending:  # no reservation (most requests): no lock to take
            return
        with self._lock:
            if (entry := self._pending.get(flow_id)) is not None:
                self._pending[flow_id] = (entry[0], complete)

    def settling(self, name: str, settled_before: int | None = None) -> bool:
        """Whether a budget refusal of token `name` may be premature: finished requests of the token still wait for
        their rows to settle (their reservations are about to shrink to their cost), or, given `settled_before`
        (settlements(name) taken before the refusal read the counters), one settled since: the counters it read
        may predate that."""
        with self._lock:
            moved = settled_before is not None and self._settlements.get(name, 0) != settled_before
            return moved or self._settling(name)

    def settlements(self, name: str) -> int:
        """How many reservations of token `name` have settled so far."""
        return self._settlements.get(name, 0)

    def _settling(self, name: str) -> bool:
        return any(reservation.token_name == name and complete is not None
                   for reservation, complete in self._pending.values())

    async def until_settled(self, name: str, timeout: float) -> None:
        """Return once no finished request of token `name` waits for its row to settle, or after `timeout` seconds.

        Woken by the writer thread's settle(), which leaves a settled reservation pending until its counters hold
        the cost: a refusal asked again after this sees them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            event = asyncio.Event()
            with self._lock:  # checked and registered together: a settle in between cannot be missed
                if not self._settling(name):
                    return
                self._waiting.append((loop, event))
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                with self._lock:
                    if (loop, event) in self._waiting:
                        self._waiting.remove((loop, event))
                return

    def waits_for(self, record: RequestRecord) -> bool:
        """Whether a reservation waits for this row to settle (the writer then takes the row at once)."""
        return record.flow_id is not None and record.flow_id in self._pending

    def settle(self, record: RequestRecord) -> BudgetState | None:
        """On the writer thread, once the row is priced: replace its reservation by its cost (or keep it).

        Never raises: the writer thread must live on, and a reservation left in place only errs on the safe side.
        """
        if record.flow_id is None or record.flow_id not in self._pending:  # tracked before forwarding, or never
            return None
        with self._lock:
            entry = self._pending.get(record.flow_id)
            if entry is None or entry[1] is None:
                return None
        try:
            actual = actual_cost(record, entry[1])
            return None if actual is None else self.counters.settle(entry[0], actual)
        except Exception:
            log.exception("metrion: could not settle the budget of %s; its reservation stays", record.token_name)
            return None
        finally:
            self._settled(record.flow_id)

    def _settled(self, flow_id: str) -> None:
        """The reservation of `flow_id` holds its cost now (or stays, if settling failed): no longer pending, and
        the refusals waiting in until_settled() look again."""
        with self._lock:
            if (entry := self._pending.pop(flow_id, None)) is not None:
                name = entry[0].token_name
                self._settlements[name] = self._settlements.get(name, 0) + 1
            waiting, self._waiting = self._waiting, []
        for loop, event in waiting:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits there any more
                loop.call_soon_threadsafe(event.set)


def token_budgets(limits: Mapping[str, tuple[float | None, str]]) -> dict[str, TokenBudget]:
    """{token name: TokenBudget} for the tokens that have a monthly dollar budget."""
    return {name: TokenBudget(nano_usd(limit), unpriced) for name, (limit, unpriced) in limits.items()
            if limit is not None}
