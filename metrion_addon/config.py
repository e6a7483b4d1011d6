"""Metrion's YAML configuration: load, validate, and report the first problem in one line.

Everything but the file's path lives in the file; secrets are kept as hashes or SecretStr.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from metrion_addon.periods import TYPES, Period, parse_duration, parse_period

PROVIDERS = ("anthropic", "openai", "gemini", "mistral", "grok")
DEFAULT_PROVIDER_URLS = {
    "anthropic": "https://api.anthropic.com/v1",
    "openai": "https://api.openai.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
    "mistral": "https://api.mistral.ai/v1",
    "grok": "https://api.x.ai/v1",
}
BUILTIN_PRICE_IDS = {"anthropic": "anthropic", "openai": "openai", "gemini": "google", "mistral": "mistral",
                     "grok": "x-ai"}
# OpenAI-compatible providers whose public base URL Metrion knows: `url:` may be left out, and their host is
# recognised through HTTPS_PROXY. Their genai-prices provider id is their name.
KNOWN_COMPATIBLE_URLS = {
    "groq": "https://api.groq.com/openai/v1",
    "deepseek": "https://api.deepseek.com",
    "openrouter": "https://openrouter.ai/api/v1",
    "together": "https://api.together.xyz/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "cerebras": "https://api.cerebras.ai/v1",
    "perplexity": "https://api.perplexity.ai",
}
_ASKS_STREAM_USAGE = ("openai", "grok", "groq")  # accept stream_options.include_usage; Mistral rejects it
FORMATS = ("openai",)
_URL_RE = re.compile(r"https?://[^/\s]+(/\S*)?")
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_RESERVED_NAMES = ("v1", "messages")  # /api/proxy/v1/... and /api/proxy/messages are Anthropic's
TOKEN_RE = re.compile(r"sk-metrion-[0-9a-f]{32}")
_HASH_RE = re.compile(r"sha256:([0-9a-f]{64})")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
DEFAULT_CONFIG_FILES = ("config.yaml", "config.example.yaml")


class ConfigError(ValueError):
    """A config problem, already phrased as one line: `file: key: problem`."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _expand_env(value: str, environ: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ValueError(f"environment variable {name} is not set")
        return environ[name]

    return _ENV_RE.sub(replace, value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


Unpriced = Literal["refuse", "allow"]


class Plan(_Strict):
    monthly_requests: Annotated[int, Field(gt=0)] | None
    monthly_usd: Annotated[float, Field(gt=0)] | None = None  # dollar budget; None = none
    unpriced: Unpriced = "refuse"  # what a budgeted token's request whose cost cannot be bounded gets

    @field_validator("monthly_usd", mode="before")
    @classmethod
    def _int_is_a_budget(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ModelPrice(_Strict):
    """USD per million tokens; cache prices default to the input price."""

    input: Annotated[float, Field(ge=0)]
    output: Annotated[float, Field(ge=0)]
    cache_read: Annotated[float, Field(ge=0)] | None = None
    cache_write: Annotated[float, Field(ge=0)] | None = None

    @field_validator("input", "output", "cache_read", "cache_write", mode="before")
    @classmethod
    def _int_is_a_price(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _megabytes(value: Any) -> Any:
    """A whole number of megabytes is a size too (strict validation refuses an int where a float is declared)."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


Megabytes = Annotated[float, BeforeValidator(_megabytes), Field(gt=0)]


class CacheSettings(_Strict):
    """The response cache's storage: a size bound (least recently used entries go first) and who shares entries."""

    max_mb: Megabytes = 512.0
    share_across_tokens: bool = False

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)

    @property
    def max_entry_bytes(self) -> int:
        """One reply may fill at most an eighth of the cache, so that a single large one cannot flush it."""
        return self.max_bytes // 8


class Provider(_Strict):
    """One upstream: where it is, which wire format it speaks, how it is priced and whether to ask for stream usage."""

    url: str
    format: str = "openai"  # "anthropic" for Anthropic; every other provider speaks OpenAI's format
    price_as: str | None = None  # genai-prices provider id; None: priced only by `prices:` overrides
    include_usage: bool = False  # add stream_options.include_usage to streams that lack it
    builtin: bool = False


class _ProviderEntry(_Strict):
    """The long form of a `providers:` entry, for OpenAI-compatible providers beyond the five."""

    url: str | None = None
    format: str
    price_as: str | None = None
    include_usage: bool | None = None


def _price_ids() -> frozenset[str]:
    from genai_prices import data_snapshot  # imported here: the CLI's config check need not load the price data

    return frozenset(provider.id for provider in data_snapshot.get_snapshot().providers)


def _provider(name: str, value: Any) -> Provider:
    """One `providers:` entry, validated: a built-in's URL, or a configured provider's mapping."""
    if name in PROVIDERS:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected the provider's base URL")
        url, entry = value, None
    elif not _NAME_RE.fullmatch(name) or name in _RESERVED_NAMES:
        raise ValueError(f"{name!r}: a provider name is lowercase letters, digits, '-' and '_' (not v1 or messages)")
    elif isinstance(value, str):
        raise ValueError(f"unknown provider {name!r} (known: {', '.join(PROVIDERS)}); "
                         "add others as {url: ..., format: openai}")
    else:
        try:
            entry = _ProviderEntry.model_validate(value)
        except ValidationError as e:
            error = e.errors()[0]
            raise ValueError(f"{name}.{_location(error['loc'])}: {error['msg']}") from None
        if entry.format not in FORMATS:
            raise ValueError(f"{name}.format: unknown format {entry.format!r} (known: {', '.join(FORMATS)})")
        url = entry.url or KNOWN_COMPATIBLE_URLS.get(name)
        if url is None:
            raise ValueError(f"{name}.url: required (Metrion does not know {name}'s base URL)")
    if not _URL_RE.fullmatch(url):
        raise ValueError(f"{name}: not an http(s) URL: {url!r}")
    if entry is None:
        return Provider(url=url.rstrip("/"), format="anthropic" if name == "anthropic" else "openai",
                        price_as=BUILTIN_PRICE_IDS[name], include_usage=name in _ASKS_STREAM_USAGE, builtin=True)
    known = _price_ids()
    price_as = entry.price_as
    if "price_as" not in entry.model_fields_set:
        price_as = name if name in known else None
    elif price_as is not None and price_as not in known:
        raise ValueError(f"{name}.price_as: genai-prices has no provider {price_as!r}")
    include_usage = entry.include_usage if entry.include_usage is not None else name in _ASKS_STREAM_USAGE
    return Provider(url=url.rstrip("/"), price_as=price_as, include_usage=include_usage)


class Token(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    token_hash: str = Field(alias="token")
    plan: str = "free"
    keys: dict[str, SecretStr] = {}
    monthly_usd: Annotated[float, Field(gt=0)] | None = None  # overrides the plan's, even as null, when given
    unpriced: Unpriced | None = None  # None: the plan's

    @field_validator("monthly_usd", mode="before")
    @classmethod
    def _int_is_a_budget(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("token_hash", mode="before")
    @classmethod
    def _hash(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = _expand_env(value, info.context["environ"]).strip()
        if TOKEN_RE.fullmatch(value):
            return hash_token(value)
        if match := _HASH_RE.fullmatch(value):
            return match.group(1)
        raise ValueError("malformed token: expected sk-metrion- and 32 lowercase hex, or sha256:<64 hex>")

    @field_validator("keys", mode="before")
    @classmethod
    def _keys(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, dict):
            return value
        keys = {}
        for provider, key in value.items():  # provider names are checked against `providers:` by Config
            if not isinstance(key, str):
                raise ValueError(f"{provider}: expected a string")
            try:
                expanded = _expand_env(key, info.context["environ"]).strip()
            except ValueError:
                if info.context["need_keys"]:
                    raise
                continue
            if expanded:  # empty means no key
                keys[provider] = SecretStr(expanded)
        return keys


class Shared(_Strict):
    """State shared by several instances: the limits on Redis, and what to do while Redis is unreachable."""

    redis: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://\S+$")]
    on_failure: Literal["closed", "local"] = "closed"


_PASSWORD_HASH_RE = re.compile(r"pbkdf2_sha256\$\d+\$[0-9a-f]+\$[0-9a-f]{64}")


class DashboardSettings(_Strict):
    """`dashboard:`: a password (or its hash, from `metrion dashboard --hash-password`) for the web dashboard."""

    password: SecretStr | None = None
    password_hash: str | None = None

    @field_validator("password_hash")
    @classmethod
    def _hash_format(cls, value: str | None) -> str | None:
        if value is not None and not _PASSWORD_HASH_RE.fullmatch(value):
            raise ValueError("expected pbkdf2_sha256$<iterations>$<salt>$<hex> (metrion dashboard --hash-password)")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> DashboardSettings:
        if self.password is not None and self.password_hash is not None:
            raise ValueError("set password or password_hash, not both")
        if self.password is not None and not self.password.get_secret_value():
            raise ValueError("password: empty")
        return self

    @property
    def protected(self) -> bool:
        return self.password is not None or self.password_hash is not None


class SMTPSettings(_Strict):
    """`alerts.smtp:` the mail server alert emails go through (plain text)."""

    host: str
    port: Annotated[int, Field(gt=0, lt=65536)] = 587
    starttls: bool = True  # upgrade with STARTTLS before logging in
    ssl: bool = False  # implicit TLS from the first byte (port 465)
    user: str | None = None
    password: SecretStr | None = None  # ${VAR} reads the environment
    sender: str = Field(alias="from")
    timeout: Annotated[float, Field(gt=0)] = 10.0

    @field_validator("password", mode="before")
    @classmethod
    def _password(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return _expand_env(value, info.context["environ"])
        except ValueError:
            if info.context["need_keys"]:
                raise
            return None

    @field_validator("timeout", mode="before")
    @classmethod
    def _int_is_seconds(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class AlertChannel(_Strict):
    """One place notifications go: a webhook (JSON POST) or a list of email addresses."""

    webhook: str | None = None
    email: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> AlertChannel:
        if (self.webhook is None) == (self.email is None):
            raise ValueError("give exactly one of webhook: URL or email: [addresses]")
        if self.webhook is not None and not _URL_RE.fullmatch(self.webhook):
            raise ValueError(f"webhook: not an http(s) URL: {self.webhook!r}")
        if self.email is not None and not self.email:
            raise ValueError("email: give at least one address")
        return self


def _seconds(value: Any) -> Any:
    return parse_duration(value) if isinstance(value, str) else value


class AlertRule(_Strict):
    """One rule: a measure over a period and scope, a threshold (warning at 90 %, alert at 100 %), channels."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]
    type: Literal["budget", "error_rate", "latency_p95", "request_volume"]
    threshold: Annotated[float, Field(gt=0)]
    unit: str
    period: Annotated[Period, BeforeValidator(parse_period)] = Period("month")
    providers: list[str] | None = None
    tokens: list[str] | None = None
    notify: Annotated[list[str], Field(min_length=1)]
    cooldown: Annotated[float | None, BeforeValidator(_seconds), Field(gt=0)] = None  # None: alerts.cooldown

    @field_validator("threshold", mode="before")
    @classmethod
    def _int_is_a_threshold(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _unit_fits(self) -> AlertRule:
        if self.unit not in TYPES[self.type]:
            raise ValueError(f"unit {self.unit!r} does not fit type {self.type} (use {' or '.join(TYPES[self.type])})")
        return self


class AlertSettings(_Strict):
    """`alerts:` rules, their channels, the SMTP server, and how often and how hard Metrion tries."""

    smtp: SMTPSettings | None = None
    channels: dict[str, AlertChannel] = {}
    rules: list[AlertRule] = []
    cooldown: Annotated[float, BeforeValidator(_seconds), Field(gt=0)] = 86_400.0  # per rule and level
    check_every: Annotated[float, BeforeValidator(_seconds), Field(ge=1)] = 5.0  # at most this often per rule
    webhook_timeout: Annotated[float, BeforeValidator(_seconds), Field(gt=0)] = 5.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3  # further attempts after a failed delivery

    @model_validator(mode="after")
    def _references(self) -> AlertSettings:
        names: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in names:
                raise ValueError(f"alerts.rules[{i}].name: duplicate rule {rule.name!r}")
            names.add(rule.name)
            for channel in rule.notify:
                if channel not in self.channels:
                    known = ", ".join(self.channels) or "none"
                    raise ValueError(f"alerts.rules[{i}].notify: unknown channel {channel!r} (known: {known})")
        for name, channel in self.channels.items():
            if channel.email is not None and self.smtp is None:
                raise ValueError(f"alerts.channels.{name}.email: needs alerts.smtp (the mail server to send through)")
        return self

    def cooldown_of(self, rule: AlertRule) -> float:
        return self.cooldown if rule.cooldown is None else rule.cooldown


POSTGRES_URL = re.compile(r"^postgres(ql)?://")


class SpoolSettings(_Strict):
    """`spool:`: where rows wait while the PostgreSQL log is unreachable (one file per instance), and its bound."""

    directory: Path = Path("metrion-spool")
    max_mb: Megabytes = 1024.0

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)


class Config(_Strict):
    path: Path
    database: Path | Annotated[str, Field(pattern=POSTGRES_URL.pattern)]  # a SQLite file, or a PostgreSQL URL
    spool: SpoolSettings = SpoolSettings()
    timeout: Annotated[float, Field(gt=0)] = 30.0
    rate_limit: Annotated[int, Field(gt=0)] = 100
    block_other_hosts: bool = False
    allow_other_hosts_without_token: bool = False
    plans: dict[str, Plan] = {"free": Plan(monthly_requests=10000), "pro": Plan(monthly_requests=None)}
    providers: dict[str, Provider] = Field(default_factory=dict, validate_default=True)
    tokens: list[Token] = []
    prices: dict[str, ModelPrice] = {}
    cache: CacheSettings = CacheSettings()
    shared: Shared | None = None
    dashboard: DashboardSettings = DashboardSettings()
    alerts: AlertSettings = AlertSettings()

    @field_validator("database", mode="before")
    @classmethod
    def _path_unless_url(cls, value: Any) -> Any:
        return Path(value) if isinstance(value, str) and not POSTGRES_URL.match(value) else value

    @model_validator(mode="after")
    def _postgres_needs_shared_limits(self) -> Config:
        # Several processes may write one PostgreSQL log, and each counting limits on its own would allow the
        # whole limit: with PostgreSQL the limits (and the cache) live on Redis, or Metrion does not start.
        if isinstance(self.database, str) and self.shared is None:
            raise ValueError("database: a PostgreSQL log needs `shared: {redis: ...}` for the limits, which every "
                             "instance writing to it must share (else each would allow the whole limit)")
        return self

    @field_validator("timeout", mode="before")
    @classmethod
    def _int_is_a_timeout(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("providers", mode="before")
    @classmethod
    def _providers(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        given = {str(name): _provider(str(name), entry) for name, entry in value.items()}
        defaults = {name: _provider(name, url) for name, url in DEFAULT_PROVIDER_URLS.items() if name not in given}
        return {**defaults, **given}

    @model_validator(mode="after")
    def _references(self) -> Config:
        names: set[str] = set()
        hashes: set[str] = set()
        for i, token in enumerate(self.tokens):
            if token.plan not in self.plans:
                known = ", ".join(self.plans)
                raise ValueError(f"tokens[{i}].plan: unknown plan {token.plan!r} (known: {known})")
            if token.name in names:
                raise ValueError(f"tokens[{i}].name: duplicate name {token.name!r}")
            if token.token_hash in hashes:
                raise ValueError(f"tokens[{i}].token: the same token is listed twice")
            names.add(token.name)
            hashes.add(token.token_hash)
            for provider in token.keys:
                if provider not in self.providers:
                    known = ", ".join(self.providers)
                    raise ValueError(f"tokens[{i}].keys: unknown provider {provider!r} (known: {known})")
        for i, rule in enumerate(self.alerts.rules):
            for field, known in (("providers", self.providers), ("tokens", names)):
                for name in getattr(rule, field) or ():
                    if name not in known:
                        raise ValueError(f"alerts.rules[{i}].{field}: unknown {field[:-1]} {name!r} "
                                         f"(known: {', '.join(known)})")
        return self

    def limits_fingerprint(self) -> str:
        """What instances sharing Redis must agree on (tokens, plans, limits), as a short digest.

        Provider keys are left out: they may differ per host, and a digest of a secret is not kept anywhere.
        """
        shape = {
            "rate_limit": self.rate_limit,
            "plans": {name: plan.model_dump() for name, plan in sorted(self.plans.items())},
            "tokens": sorted(repr(sorted(t.model_dump(exclude={"keys"}).items())) for t in self.tokens),
        }
        return hashlib.sha256(repr(shape).encode()).hexdigest()[:16]

    def budget_usd(self, token: Token) -> float | None:
        """The monthly budget: the token's own `monthly_usd` if the file sets one (even null), else its plan's."""
        return token.monthly_usd if "monthly_usd" in token.model_fields_set else self.plans[token.plan].monthly_usd

    def unpriced(self, token: Token) -> Unpriced:
        return token.unpriced or self.plans[token.plan].unpriced

    def token_by_hash(self) -> dict[str, Token]:
        return {token.token_hash: token for token in self.tokens}


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def load_config(path: str | Path, environ: Mapping[str, str] | None = None, *, need_keys: bool = True) -> Config:
    """Read and validate the YAML file at `path`; raise ConfigError with one line on any problem.

    `need_keys=False` (the CLI, which never calls a provider) skips provider keys whose variables are unset.
    """
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}not valid YAML: {getattr(e, 'problem', e)}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    if "path" in raw:
        raise ConfigError(f"{path}: path: Extra inputs are not permitted")
    database = raw.get("database", "metrion.db")
    if isinstance(database, str) and not POSTGRES_URL.match(database):
        raw = {**raw, "database": path.parent / database}
    spool = raw.get("spool")
    directory = spool.get("directory", "metrion-spool") if isinstance(spool, dict) else "metrion-spool"
    if isinstance(directory, str):
        raw = {**raw, "spool": {**(spool if isinstance(spool, dict) else {}), "directory": path.parent / directory}}
    try:
        return Config.model_validate({**raw, "path": path}, context={"environ": environ, "need_keys": need_keys})
    except ValidationError as e:
        error = e.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        where = _location(error["loc"])
        if message.startswith(("tokens[", "alerts.")):
            where, _, message = message.partition(": ")
        raise ConfigError(f"{path}: {where}: {message}" if where else f"{path}: {message}") from e


def find_config(explicit: str | None, cwd: Path | None = None) -> Path:
    """The file to use: the one given, else ./config.yaml, else ./config.example.yaml."""
    if explicit:
        return Path(explicit)
    cwd = cwd or Path.cwd()
    for name in DEFAULT_CONFIG_FILES:
        if (cwd / name).is_file():
            return cwd / name
    raise ConfigError(f"no config file: pass one explicitly, or create {' or '.join(DEFAULT_CONFIG_FILES)}")
