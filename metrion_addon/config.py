"""Metrion's YAML configuration: load, validate, and report the first problem in one line.

Everything but the file's path lives in the file; secrets are kept as hashes or SecretStr.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

PROVIDERS = ("anthropic", "openai", "gemini", "mistral", "grok")
DEFAULT_PROVIDER_URLS = {
    "anthropic": "https://api.anthropic.com/v1",
    "openai": "https://api.openai.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
    "mistral": "https://api.mistral.ai/v1",
    "grok": "https://api.x.ai/v1",
}
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


class Plan(_Strict):
    monthly_requests: Annotated[int, Field(gt=0)] | None


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


class CacheSettings(_Strict):
    """The response cache's storage: a size bound (least recently used entries go first) and who shares entries."""

    max_mb: Annotated[float, Field(gt=0)] = 512.0
    share_across_tokens: bool = False

    @field_validator("max_mb", mode="before")
    @classmethod
    def _int_is_a_size(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)

    @property
    def max_entry_bytes(self) -> int:
        """One reply may fill at most an eighth of the cache, so that a single large one cannot flush it."""
        return self.max_bytes // 8


class Token(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    token_hash: str = Field(alias="token")
    plan: str = "free"
    keys: dict[str, SecretStr] = {}

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
        for provider, key in value.items():
            if provider not in PROVIDERS:
                raise ValueError(f"unknown provider {provider!r} (known: {', '.join(PROVIDERS)})")
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


class Config(_Strict):
    path: Path
    database: Path
    timeout: Annotated[float, Field(gt=0)] = 30.0
    rate_limit: Annotated[int, Field(gt=0)] = 100
    block_other_hosts: bool = False
    plans: dict[str, Plan] = {"free": Plan(monthly_requests=10000), "pro": Plan(monthly_requests=None)}
    providers: dict[str, str] = Field(default_factory=dict, validate_default=True)
    tokens: list[Token] = []
    prices: dict[str, ModelPrice] = {}
    cache: CacheSettings = CacheSettings()
    dashboard: DashboardSettings = DashboardSettings()

    @field_validator("timeout", mode="before")
    @classmethod
    def _int_is_a_timeout(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("providers", mode="after")
    @classmethod
    def _providers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, url in value.items():
            if name not in PROVIDERS:
                raise ValueError(f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})")
            if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
                raise ValueError(f"{name}: not an http(s) URL: {url!r}")
        return {**DEFAULT_PROVIDER_URLS, **{name: url.rstrip("/") for name, url in value.items()}}

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
        return self

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
    if isinstance(database, str):
        raw = {**raw, "database": path.parent / database}
    try:
        return Config.model_validate({**raw, "path": path}, context={"environ": environ, "need_keys": need_keys})
    except ValidationError as e:
        error = e.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        where = _location(error["loc"])
        if message.startswith("tokens["):
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
