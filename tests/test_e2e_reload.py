"""Live reload on a real mitmdump: an edited config file (or SIGHUP) takes effect without a restart.

Connections stay open and counters keep counting across it; a bad file keeps the running config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from harness import APP_TOKEN, Proxy, token
from receivers import WebhookReceiver, wait_for
from test_e2e_metering import request_for

METRION = Path(sys.executable).parent / "metrion"
TINY = token(31)
NOW = "2026-11-10T12:00:00Z"


def config_path(proxy: Proxy) -> Path:
    return proxy.workdir / "config.yaml"


def wait_for_log(proxy: Proxy, text: str, after: int, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = proxy.log_path.read_text()[after:]
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{proxy.log_path.read_text()[after:]}")


def post(client: httpx.Client, proxy: Proxy, key: str) -> httpx.Response:
    path, body, _ = request_for("openai", stream=False)
    return client.post(f"{proxy.url}{path}", json=body, headers={"authorization": f"Bearer {key}"})


def edit(proxy: Proxy, change: dict) -> int:
    """Rewrite the config file with `change` applied; the log offset before it."""
    offset = len(proxy.log_path.read_text())
    proxy.config.update(change)
    config_path(proxy).write_text(yaml.safe_dump(proxy.config))
    return offset


def test_a_token_made_by_metrion_tokens_new_works_after_a_file_edit_on_open_connections(start_proxy,
                                                                                       tmp_path: Path) -> None:
    (tmp_path / "now").write_text(NOW)
    proxy = start_proxy(env={"METRION_CLOCK_FILE": str(tmp_path / "now")}, rate_limit=3,
                        tokens=[{"name": "tiny", "token": TINY, "plan": "pro", "keys": {"openai": "k"}}])
    made = subprocess.run([str(METRION), "tokens", "new", "--name", "late", "--plan", "pro", "--format", "json",
                           "--config", str(config_path(proxy))], capture_output=True, text=True, check=True)
    new = json.loads(made.stdout)[0]
    with httpx.Client(timeout=30) as client:  # one keep-alive connection across the reload
        assert [post(client, proxy, TINY).status_code for _ in range(2)] == [200, 200]
        assert post(client, proxy, new["token"]).status_code == 401
        entry = {**yaml.safe_load(new["yaml"])[0], "keys": {"openai": "k"}}
        offset = edit(proxy, {"tokens": [*proxy.config["tokens"], entry]})
        assert "reloaded" in wait_for_log(proxy, "metrion: reloaded", offset)
        assert post(client, proxy, new["token"]).status_code == 200
        assert post(client, proxy, TINY).status_code == 200  # the bucket kept its count: third of 3
        assert post(client, proxy, TINY).status_code == 429
    assert len(proxy.rows("token_name = 'late'", n=1)) == 1


def test_a_bad_edit_is_refused_with_one_line_and_the_old_config_keeps_serving(start_proxy) -> None:
    proxy = start_proxy()
    offset = len(proxy.log_path.read_text())
    config_path(proxy).write_text(config_path(proxy).read_text() + "\nrate_limit: -5\n")
    log = wait_for_log(proxy, "keeping the running config", offset)
    lines = [line for line in log.splitlines() if "keeping the running config" in line]
    assert len(lines) == 1 and "rate_limit" in lines[0]
    offset = edit(proxy, {"database": str(proxy.workdir / "other.db")})
    assert "database: changing it needs a restart" in wait_for_log(proxy, "keeping the running config", offset)
    with httpx.Client(timeout=30) as client:
        assert post(client, proxy, APP_TOKEN).status_code == 200


def test_sighup_reloads_a_change_the_file_watch_cannot_see(start_proxy) -> None:
    proxy = start_proxy(rate_limit=100)
    path = config_path(proxy)
    before = path.stat()
    path.write_text(path.read_text().replace("rate_limit: 100", "rate_limit: 200"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, inode and time: invisible to polling
    time.sleep(1.5)
    with httpx.Client(timeout=30) as client:
        assert post(client, proxy, APP_TOKEN).headers["x-metrion-ratelimit-limit"] == "100"
        offset = len(proxy.log_path.read_text())
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGHUP)
        wait_for_log(proxy, "metrion: reloaded", offset)
        assert post(client, proxy, APP_TOKEN).headers["x-metrion-ratelimit-limit"] == "200"


def test_alert_rules_added_by_a_reload_start_notifying(start_proxy) -> None:
    receiver = WebhookReceiver().start()
    try:
        proxy = start_proxy(prices={"gpt-4o": {"input": 0, "output": 1_000_000}})  # $3 a request
        with httpx.Client(timeout=30) as client:
            assert [post(client, proxy, APP_TOKEN).status_code for _ in range(4)] == [200] * 4
        proxy.rows(n=4)
        rule = {"name": "spend", "type": "budget", "threshold": 10, "unit": "usd", "period": "month",
                "notify": ["ops"]}
        offset = edit(proxy, {"alerts": {"channels": {"ops": {"webhook": receiver.url}}, "rules": [rule],
                                         "check_every": "1s"}})
        wait_for_log(proxy, "metrion: reloaded", offset)
        assert wait_for(lambda: [body["level"] for body in receiver.received] == ["alert"])
        assert receiver.received[0]["rule"] == "spend"
    finally:
        receiver.stop()
