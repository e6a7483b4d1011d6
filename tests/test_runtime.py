"""What a config runs, opened and reloaded without a proxy: database refusals, in-place reload, a clean close."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metrion_addon.config import ConfigError
from metrion_addon.metrics import Metrics
from metrion_addon.runtime import Runtime, monthly_caps

TOKEN = "sk-metrion-" + "d" * 32


def write_config(path: Path, database: Path, *tokens: str) -> Path:
    path.write_text(yaml.safe_dump({"database": str(database), "tokens": [
        {"name": name, "token": f"sk-metrion-{i:032x}", "plan": "free"} for i, name in enumerate(tokens)]}))
    return path


def runtime() -> Runtime:
    return Runtime(lambda: 1_795_000_000.0, Metrics(), lambda records: None)


def test_a_database_in_a_missing_directory_is_a_config_error_naming_the_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "missing" / "m.db", "app")
    with pytest.raises(ConfigError, match=r"c\.yaml: database: cannot use .*missing"):
        runtime().open(str(config), lambda: None)


def test_a_second_runtime_on_the_same_database_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "m.db", "app")
    first = runtime()
    first.open(str(config), lambda: None)
    try:
        with pytest.raises(ConfigError, match=r"c\.yaml: database: "):
            runtime().open(str(config), lambda: None)
    finally:
        first.close()
    second = runtime()
    second.open(str(config), lambda: None)
    second.close()
    assert second.writer is None and second.cache is None


def test_reload_applies_new_tokens_in_place_and_keeps_the_writer(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "m.db", "app")
    running = runtime()
    running.open(str(config), lambda: None)
    try:
        writer = running.writer
        write_config(config, tmp_path / "m.db", "app", "batch")
        running.reload()
        assert running.writer is writer
        assert sorted(token.name for token in running.tokens.values()) == ["app", "batch"]
        assert monthly_caps(running.config) == {name: plan.monthly_requests
                                                for name, plan in running.config.plans.items()}
    finally:
        running.close()


def test_a_reload_that_needs_a_restart_keeps_the_running_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "m.db", "app")
    running = runtime()
    running.open(str(config), lambda: None)
    try:
        before = running.config
        write_config(config, tmp_path / "other.db", "app", "batch")
        running.reload()
        assert running.config is before
    finally:
        running.close()
