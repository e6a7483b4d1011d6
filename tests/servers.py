"""Private Redis and PostgreSQL servers for tests: real binaries on free loopback ports, in their own dirs.

Each can be killed and started again on the same port mid-test; stop() always cleans up what start() made.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"  # initdb refuses root: the cluster belongs to this system user


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until something listens on 127.0.0.1:`port`; raise if `process` exits first or `timeout` passes (quoting the
    end of its `log`, when there is one)."""

    def said() -> str:
        return f":\n{log.read_text()[-3000:]}" if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening on {port}{said()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s{said()}")


@dataclass
class RedisServer:
    """A redis-server without persistence on a free port; kill() and start() keep the port."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.port, 10, self.process)
        return self

    def kill(self) -> None:
        """SIGKILL: the data is gone, as when a Redis without persistence dies."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    stop = kill


@dataclass
class PostgresServer:
    """A private PostgreSQL 15 cluster (initdb once, trust auth on loopback) owned by the `postgres` user."""

    port: int = field(default_factory=free_port)
    datadir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="metrion-pg-")))
    initialised: bool = False

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self, *args: str, timeout: float = 60) -> None:
        command = ["runuser", "-u", PG_USER, "--", *args] if os.geteuid() == 0 else list(args)
        subprocess.run(command, check=True, capture_output=True, timeout=timeout, cwd=self.datadir)

    def start(self) -> PostgresServer:
        data = self.datadir / "data"
        if not self.initialised:
            if os.geteuid() == 0:
                shutil.chown(self.datadir, PG_USER)
            self._as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER,
                              "--no-sync", "-E", "UTF8", "--locale", "C")
            self.initialised = True
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(self.datadir / "postgres.log"), "-w", "-t", "30",
            "-o", f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c full_page_writes=off -c max_connections=50",
            "start",
        )
        wait_for_port(self.port, 10)
        return self

    def kill(self) -> None:
        """Stop the postmaster at once (`immediate`: no checkpoint, clients cut), as a crash would."""
        self._pg_ctl_stop("immediate")

    def stop(self) -> None:
        self._pg_ctl_stop("fast")

    def _pg_ctl_stop(self, mode: str) -> None:
        pid_file = self.datadir / "data" / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.datadir / "data"), "-m", mode, "-w", "stop")
        except subprocess.CalledProcessError:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)

    def create_database(self, name: str) -> str:
        """A fresh empty database; its URL."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)
