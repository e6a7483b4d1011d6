"""The benchmark's other targets: Portkey's gateway (Node) and two Metrion instances behind HAProxy, their limits
on Redis and their log on PostgreSQL.

Portkey is installed from npm into bench/.portkey/ (git-ignored) on first use; HAProxy runs deploy/haproxy.cfg;
PostgreSQL is a private cluster (tests/servers.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import free_port  # noqa: E402
from servers import PG_BIN, PostgresServer, RedisServer, wait_for_port  # noqa: E402  (the tests' private servers on free ports)

PORTKEY_VERSION = "1.15.2"
PORTKEY_DIR = BENCH / ".portkey"
PORTKEY_SERVER = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"


def stop_process(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def peers_missing() -> list[str]:
    """Commands the peer targets need that this machine lacks."""
    commands = [c for c in ("node", "npm", "haproxy", "redis-server") if shutil.which(c) is None]
    return commands + ([] if (PG_BIN / "initdb").exists() else [str(PG_BIN / "initdb")])


def install_portkey() -> None:
    if PORTKEY_SERVER.exists():
        return
    PORTKEY_DIR.mkdir(exist_ok=True)
    subprocess.run(["npm", "install", "--prefix", str(PORTKEY_DIR), "--no-audit", "--no-fund", "--no-save",
                    f"@portkey-ai/gateway@{PORTKEY_VERSION}"], check=True, capture_output=True, timeout=600)


class Running:
    """What every started peer offers: its pid, and a stop that ends its `process` (gently first)."""

    process: subprocess.Popen | None

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


@dataclass
class Portkey(Running):
    """`@portkey-ai/gateway` in one Node process on loopback (its CLI binds every address; the preload narrows it).

    Requests name the upstream per call (`x-portkey-provider: openai`, `x-portkey-custom-host`), as its docs
    describe for a self-hosted OpenAI-compatible upstream.
    """

    workdir: Path
    port: int = 0
    process: subprocess.Popen | None = None

    def start(self) -> Portkey:
        install_portkey()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.workdir / "portkey.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                ["node", "--import", str(BENCH / "loopback.mjs"), str(PORTKEY_SERVER), f"--port={self.port}",
                 "--headless"], cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "NODE_ENV": "production"})
        wait_for_port(self.port, 30, self.process, log)
        return self


@dataclass
class HAProxy(Running):
    """deploy/haproxy.cfg in front of the given instance ports (two: the file names METRION_1 and METRION_2)."""

    workdir: Path
    backends: tuple[int, int]
    port: int = 0
    process: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.workdir / "haproxy.log"
        env = {**os.environ, "METRION_LISTEN": f"127.0.0.1:{self.port}",
               "METRION_1": f"127.0.0.1:{self.backends[0]}", "METRION_2": f"127.0.0.1:{self.backends[1]}",
               "METRION_HAPROXY_SOCKET": str(self.workdir / "haproxy.sock")}
        with log.open("ab") as out:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
                                            env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 30, self.process, log)
        return self


__all__ = ["HAProxy", "Portkey", "PostgresServer", "RedisServer", "Running", "free_port", "peers_missing"]
