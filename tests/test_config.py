"""A bad config stops start-up with one line naming the file, the key and the problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from metrion_addon.config import ConfigError, find_config, hash_token, load_config
from metrion_addon.reload import needs_restart

TOKEN = "sk-metrion-" + "0" * 32
GOOD = f"""
database: m.db
timeout: 5
tokens:
  - name: app
    token: {TOKEN}
    keys: {{openai: "${{KEY}}"}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "metrion.yaml"
    path.write_text(text)
    return path


def test_good_config_keeps_only_the_token_hash(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), {"KEY": "sk-openai"})
    (token,) = config.tokens
    assert token.token_hash == hash_token(TOKEN) and TOKEN not in repr(config)
    assert token.keys["openai"].get_secret_value() == "sk-openai" and "sk-openai" not in repr(config)
    assert config.database == tmp_path / "m.db"  # relative to the config file
    assert config.timeout == 5.0 and config.rate_limit == 100
    assert config.plans["free"].monthly_requests == 10000 and config.plans["pro"].monthly_requests is None
    assert config.providers["gemini"].url == "https://generativelanguage.googleapis.com/v1beta/openai"


def test_configured_openai_compatible_providers_sit_beside_the_five(tmp_path: Path) -> None:
    text = GOOD + """
providers:
  openai: http://127.0.0.1:9/openai/v1/
  groq: {format: openai}
  deepseek: {url: https://api.deepseek.com/v1, format: openai, include_usage: true}
  local: {url: http://127.0.0.1:11434/v1, format: openai, price_as: null}
  router: {url: https://example.test/v1, format: openai, price_as: openrouter}
"""
    config = load_config(write(tmp_path, text), {"KEY": "k"})
    providers = config.providers
    assert providers["openai"].url == "http://127.0.0.1:9/openai/v1" and providers["openai"].price_as == "openai"
    assert providers["anthropic"].format == "anthropic" and providers["mistral"].include_usage is False
    assert (providers["groq"].url, providers["groq"].price_as, providers["groq"].include_usage) == (
        "https://api.groq.com/openai/v1", "groq", True)
    assert (providers["deepseek"].price_as, providers["deepseek"].include_usage) == ("deepseek", True)
    assert (providers["local"].price_as, providers["local"].include_usage) == (None, False)
    assert providers["router"].price_as == "openrouter"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("groq: {format: cohere}", "groq.format: unknown format 'cohere' (known: openai)"),
        ("mine: {format: openai}", "mine.url: required"),
        ("mine: {url: http://x, format: openai, price_as: nope}", "mine.price_as: genai-prices has no provider 'nope'"),
        ("mine: {url: http://x}", "mine.format: Field required"),
        ("mine: http://x", "unknown provider 'mine'"),
        ("v1: {url: http://x, format: openai}", "'v1': a provider name is lowercase letters"),
        ("openai: {url: http://x}", "openai: expected the provider's base URL"),
    ],
)
def test_bad_provider_entries_are_one_clear_line(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match="providers: " + re.escape(message)):
        load_config(write(tmp_path, f"providers:\n  {entry}\n"), {})


def test_stored_keys_may_name_configured_providers_only(tmp_path: Path) -> None:
    text = (f"providers: {{groq: {{format: openai}}}}\n"
            f"tokens: [{{name: a, token: {TOKEN}, keys: {{groq: g, cohere: c}}}}]\n")
    with pytest.raises(ConfigError, match=r"tokens\[0\].keys: unknown provider 'cohere'"):
        load_config(write(tmp_path, text), {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: blue\n", "colour: Extra inputs are not permitted"),
        ("timeout: soon\n", "timeout: Input should be a valid number"),
        ("rate_limit: -1\n", "rate_limit: Input should be greater than 0"),
        ("providers: {cohere: http://x}\n", "providers: Value error, unknown provider 'cohere'"),
        ("providers: {openai: ftp://x}\n", "providers: Value error, openai: not an http(s) URL"),
        ("tokens: [{name: a, token: sk-metrion-123}]\n", "tokens[0].token: malformed token"),
        (f"tokens: [{{name: a, token: {TOKEN}, plan: gold}}]\n", "tokens[0].plan: unknown plan 'gold'"),
        (f"tokens: [{{name: a, token: {TOKEN}, keys: {{openai: '${{NOPE}}'}}}}]\n",
         "tokens[0].keys: environment variable NOPE is not set"),
        (f"tokens: [{{name: a, token: {TOKEN}}}, {{name: a, token: sha256:{'1' * 64}}}]\n",
         "tokens[1].name: duplicate name 'a'"),
        ("plans: {free: {monthly_requests: lots}}\n", "plans.free.monthly_requests: Input should be a valid integer"),
        ("- just a list\n", "expected a mapping of settings at the top level"),
        ("timeout: [\n", "not valid YAML"),
        ("database: postgresql://m:secret@db/m\n", "database: a PostgreSQL log needs `shared: {redis: ...}`"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"{path}: ")
    assert message.replace("Value error, ", "") in line


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml", {})


def test_empty_key_means_no_stored_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), {"KEY": ""})
    assert config.tokens[0].keys == {}


def test_default_config_file_prefers_config_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config file"):
        find_config(None, tmp_path)
    (tmp_path / "config.example.yaml").write_text("")
    assert find_config(None, tmp_path).name == "config.example.yaml"
    (tmp_path / "config.yaml").write_text("")
    assert find_config(None, tmp_path).name == "config.yaml"
    assert find_config("elsewhere.yaml", tmp_path) == Path("elsewhere.yaml")


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "config.example.yaml", {"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "x"})
    assert [t.name for t in config.tokens] == ["demo-app"]


def test_cli_can_read_a_config_whose_key_variables_are_unset(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), {}, need_keys=False)
    assert config.tokens[0].keys == {}


def test_dollar_budgets_come_from_the_plan_unless_the_token_sets_its_own(tmp_path: Path) -> None:
    text = f"""
plans: {{metered: {{monthly_requests: null, monthly_usd: 5}}, pro: {{monthly_requests: null}}}}
tokens:
  - {{name: inherits, token: {TOKEN}, plan: metered}}
  - {{name: own, token: "sha256:{'1' * 64}", plan: pro, monthly_usd: 2.5, unpriced: allow}}
  - {{name: none, token: "sha256:{'2' * 64}", plan: metered, monthly_usd: null}}
"""
    config = load_config(write(tmp_path, text), {})
    inherits, own, none = config.tokens
    assert config.budget_usd(inherits) == 5.0 and config.unpriced(inherits) == "refuse"
    assert config.budget_usd(own) == 2.5 and config.unpriced(own) == "allow"
    assert config.budget_usd(none) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("plans: {free: {monthly_requests: 1, monthly_usd: -5}}\n", "plans.free.monthly_usd: Input should be greater"),
        ("plans: {free: {monthly_requests: 1, unpriced: maybe}}\n", "plans.free.unpriced: Input should be 'refuse'"),
        (f"tokens: [{{name: a, token: {TOKEN}, monthly_usd: x}}]\n", "tokens[0].monthly_usd: Input should be a valid"),
    ],
)
def test_bad_budgets_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), {})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_postgres_url_is_kept_and_the_spool_sits_beside_the_config(tmp_path: Path) -> None:
    path = write(tmp_path, "database: postgresql://metrion:secret@db/metrion\nshared: {redis: redis://r:6379/0}\n"
                 "spool: {max_mb: 8}\n")
    config = load_config(path, {})
    assert config.database == "postgresql://metrion:secret@db/metrion"
    assert config.spool.directory == tmp_path / "metrion-spool" and config.spool.max_bytes == 8 * 1024 * 1024
    assert load_config(write(tmp_path, "database: sub/m.db\n"), {}).database == tmp_path / "sub" / "m.db"


def test_the_database_shared_state_and_spool_change_only_with_a_restart(tmp_path: Path) -> None:
    base = "database: postgresql://m@db/m\nshared: {redis: redis://r:6379/0}\n"
    old = load_config(write(tmp_path, base), {})
    assert needs_restart(old, load_config(write(tmp_path, base + "rate_limit: 7\n"), {})) is None
    assert needs_restart(old, load_config(write(tmp_path, base + "spool: {max_mb: 8}\n"), {})) == \
        "spool: changing it needs a restart"
    assert needs_restart(old, load_config(write(tmp_path, base.replace("db/m", "db/n")), {})) == \
        "database: changing it needs a restart"
