"""A real mitmdump with the Metrion addon, started for a test with its own config, database and CA.

Waits until the port answers; stop() is a clean SIGTERM so the writer's flush is part of what is tested.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml

ROOT = Path(__file__).resolve().parent.parent
MITMDUMP = Path(sys.executable).parent / "mitmdump"

# Tokens used across the tests, and the provider keys stored for the first one.
APP_TOKEN = "sk-metrion-" + "a" * 32
PASS_TOKEN = "sk-metrion-" + "b" * 32
STORED_KEYS = {p: f"sk-stored-{p}-key" for p in ("anthropic", "openai", "gemini", "mistral", "grok")}
CLIENT_KEY = "sk-client-own-provider-key"


def _copy(source: IO[bytes], path: Path) -> None:
    with path.open("ab") as log:
        for line in source:
            log.write(line)
            log.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token(n: int) -> str:
    return f"sk-metrion-{n:032x}"


def base_config(mock_base_url, db: Path, **overrides: object) -> dict:
    config: dict = {
        "database": str(db),
        "timeout": 30,
        "rate_limit": 1000,
        "providers": {p: mock_base_url(p) for p in ("anthropic", "openai", "gemini", "mistral", "grok")},
        "plans": {"free": {"monthly_requests": 10000}, "pro": {"monthly_requests": None}},
        "tokens": [
            {"name": "app", "token": APP_TOKEN, "plan": "pro", "keys": dict(STORED_KEYS)},
            {"name": "passthrough", "token": PASS_TOKEN, "plan": "pro"},
        ],
    }
    config.update(overrides)
    return config


@dataclass
class Proxy:
    workdir: Path
    config: dict
    env: dict[str, str] = field(default_factory=dict)
    scripts: tuple[Path, ...] = ()  # more mitmproxy scripts, loaded after the addon (e.g. tests/fault_injection.py)
    options: tuple[str, ...] = ("connection_strategy=lazy",)  # mitmproxy options beyond listen address and confdir
    port: int = 0
    process: subprocess.Popen | None = None
    pipe_log: bool = False  # log through a pipe: a file-size limit set on mitmdump then spares its log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return Path(self.config["database"])

    @property
    def log_path(self) -> Path:
        return self.workdir / "mitmdump.log"

    @property
    def ca_cert(self) -> Path:
        return self.workdir / "confdir" / "mitmproxy-ca-cert.pem"

    def start(self) -> Proxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.port = self.port or free_port()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(MITMDUMP), "-s", str(ROOT / "metrion_addon" / "addon.py"),
                 *(arg for script in self.scripts for arg in ("-s", str(script))),
                 "--set", f"metrion_config={config_path}", "--set", f"confdir={self.workdir / 'confdir'}",
                 "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
                 *(arg for option in self.options for arg in ("--set", option)),
                 "--set", "termlog_verbosity=info", "--set", "flow_detail=0"],
                cwd=self.workdir, stdout=subprocess.PIPE if self.pipe_log else log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        if self.pipe_log:
            threading.Thread(target=_copy, args=(self.process.stdout, self.log_path), daemon=True).start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            if b"metrion: metering" in self.log_path.read_bytes()[offset:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"mitmdump did not listen:\n{self.log_path.read_text()}")

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def restart(self) -> Proxy:
        self.stop()
        return self.start()

    def rows(self, where: str = "1", params: tuple = (), n: int | None = None, timeout: float = 5.0) -> list[dict]:
        """Rows of `requests` matching `where`, waiting (up to `timeout`) until there are at least `n`."""
        deadline = time.monotonic() + timeout
        while True:
            rows = []
            if self.db_path.exists():
                with sqlite3.connect(self.db_path) as conn:
                    conn.row_factory = sqlite3.Row
                    try:
                        cursor = conn.execute(f"SELECT * FROM requests WHERE {where} ORDER BY id", params)
                        rows = [dict(row) for row in cursor]
                    except sqlite3.OperationalError:
                        rows = []
            if (n is None and rows) or (n is not None and len(rows) >= n) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)
