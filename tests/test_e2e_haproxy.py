"""Two Metrion instances behind a real HAProxy running deploy/haproxy.cfg, as the README deploys them: limits on one
Redis, one request log on PostgreSQL.

The official openai SDK talks to HAProxy only. One set of processes serves the module's tests, in order.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import psycopg
import pytest
from harness import ROOT, Proxy, base_config, free_port, token
from psycopg.rows import dict_row
from receivers import wait_for
from servers import PostgresServer, RedisServer, wait_for_port

from metrion_addon.mock_provider import MockProvider

CONFIG = ROOT / "deploy" / "haproxy.cfg"
CAPPED = token(31)  # a plan of CAP requests a month
UNCAPPED = token(32)
CAP = 60
NOW = "2026-11-10T12:00:00Z"


@dataclass
class HAProxy:
    process: subprocess.Popen
    port: int
    socket_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        """One command on HAProxy's runtime API socket; its answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    def wait_for_socket(self, timeout: float) -> None:
        """Until the runtime API socket exists: HAProxy listens on its port a moment before it creates the socket."""
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            assert time.monotonic() < deadline and self.process.poll() is None, self.log_path.read_text()
            time.sleep(0.02)

    def servers(self) -> dict[str, str]:
        """Each instance's state as HAProxy's health checks see it: UP, DOWN, MAINT, ... (`show stat`)."""
        return {name: row["status"] for name, row in self._stats().items()}

    def answered(self, name: str) -> int:
        """How many 2xx answers HAProxy has passed on from this instance (kept across the instance's restarts)."""
        return int(self._stats()[name]["hrsp_2xx"] or 0)

    def _stats(self) -> dict[str, dict[str, str]]:
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r["pxname"] == "instances" and r["svname"] != "BACKEND"}

    def wait_for(self, states: dict[str, str], timeout: float) -> float:
        """Seconds until every named instance is in the given state."""
        t0 = time.monotonic()
        while not all(self.servers().get(k, "").startswith(v) for k, v in states.items()):
            assert time.monotonic() - t0 < timeout, (self.servers(), self.log_path.read_text())
            time.sleep(0.05)
        return time.monotonic() - t0


@dataclass
class Deployment:
    haproxy: HAProxy
    instances: list[Proxy]
    redis: RedisServer
    database: str

    def client(self, key: str, user: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.haproxy.url}/api/proxy/openai/v1", api_key=key, max_retries=0,
                             timeout=20, default_headers={"x-metrion-user": user})

    def rows(self, user: str) -> list[dict]:
        """This user's rows in the one log both instances write."""
        with psycopg.connect(self.database, row_factory=dict_row) as conn:
            return conn.execute("SELECT * FROM requests WHERE requester = %s", (user,)).fetchall()


@pytest.fixture(scope="module")
def deployment(mock: MockProvider, postgres_cluster: PostgresServer,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("haproxy")
    redis = RedisServer(workdir / "redis").start()
    database = postgres_cluster.create_database("metrion_haproxy")
    clock = workdir / "now"
    clock.write_text(NOW)
    shared = {"rate_limit": 100_000, "shared": {"redis": redis.url}, "database": database,
              "plans": {"team": {"monthly_requests": CAP}, "pro": {"monthly_requests": None}},
              "tokens": [{"name": "team", "token": CAPPED, "plan": "team", "keys": {"openai": "sk-stored"}},
                         {"name": "load", "token": UNCAPPED, "plan": "pro", "keys": {"openai": "sk-stored"}}]}
    instances: list[Proxy] = []
    haproxy = None
    try:
        for n in (1, 2):
            home = workdir / f"metrion{n}"
            instances.append(Proxy(home, base_config(mock.base_url, home / "unused.db", **shared),
                                   env={"METRION_CLOCK_FILE": str(clock)}).start())
        port = free_port()
        env = {**os.environ, "METRION_LISTEN": f"127.0.0.1:{port}", "METRION_1": f"127.0.0.1:{instances[0].port}",
               "METRION_2": f"127.0.0.1:{instances[1].port}", "METRION_HAPROXY_SOCKET": str(workdir / "haproxy.sock")}
        log_path = workdir / "haproxy.log"
        with log_path.open("wb") as log:  # -db: foreground, state changes on stderr
            process = subprocess.Popen(["haproxy", "-db", "-f", str(CONFIG)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        wait_for_port(port, 10, process)
        haproxy = HAProxy(process, port, workdir / "haproxy.sock", log_path)
        haproxy.wait_for_socket(timeout=10)
        haproxy.wait_for({"metrion1": "UP", "metrion2": "UP"}, timeout=10)
        yield Deployment(haproxy, instances, redis, database)
    finally:
        if haproxy is not None:
            haproxy.process.terminate()
            haproxy.process.wait(10)
        for instance in instances:
            instance.stop()
        redis.kill()


def test_requests_through_haproxy_share_one_monthly_cap_and_leave_one_row_each(
    deployment: Deployment, mock: MockProvider
) -> None:
    user = f"cap-{uuid.uuid4()}"
    client = deployment.client(CAPPED, user)

    def call(i: int) -> int:
        try:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"{user} {i}"}])
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    served = [deployment.haproxy.answered(name) for name in ("metrion1", "metrion2")]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(call, range(CAP + 20)))
    assert statuses.count(200) == CAP and statuses.count(429) == 20
    assert sum(user.encode() in r.body for r in mock.received) == CAP  # forwarded: exactly the cap
    deadline = time.monotonic() + 5
    while len(rows := deployment.rows(user)) < CAP + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rows) == CAP + 20 and sum(r["status"] == 200 for r in rows) == CAP
    assert len({r["uid"] for r in rows}) == CAP + 20  # one row each, none written twice
    assert all(deployment.haproxy.answered(name) > before  # both instances served
               for name, before in zip(("metrion1", "metrion2"), served, strict=True))


class Load:
    """`clients` SDK clients calling without pause on their own threads; when each call failed and how."""

    def __init__(self, client: openai.OpenAI, marker: str, clients: int = 2) -> None:
        self.client, self.marker, self.ok, self.failures = client, marker, 0, []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": self.marker}],
                                                    extra_headers={"x-mock-scenario": "slow-headers:0.02"})
                with self._lock:
                    self.ok += 1
            except (openai.APIStatusError, openai.APIConnectionError) as e:
                with self._lock:
                    self.failures.append((time.monotonic(), repr(e)))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_a_drained_instance_restarts_without_one_failed_request(deployment: Deployment) -> None:
    """The planned restart: drain it in HAProxy (runtime API), stop it, start it, set it ready."""
    user = f"drain-{uuid.uuid4()}"
    first, _ = deployment.instances
    load = Load(deployment.client(UNCAPPED, user), user)
    try:
        time.sleep(0.5)
        deployment.haproxy.command("set server instances/metrion1 state drain")
        time.sleep(0.3)  # its in-flight requests finish (each takes 20 ms upstream)
        first.stop()
        stopped = deployment.haproxy.answered("metrion1")
        first.start()
        deployment.haproxy.command("set server instances/metrion1 state ready")
        back = deployment.haproxy.wait_for({"metrion1": "UP"}, timeout=8)
        time.sleep(0.5)
    finally:
        load.stop()
    assert load.failures == [] and load.ok > 50
    assert back <= 4  # rise 2 at 1 s intervals
    assert deployment.haproxy.answered("metrion1") > stopped  # serving again


def test_an_instance_stopped_without_drain_costs_only_the_moment_of_its_stop(
    deployment: Deployment, mock: MockProvider
) -> None:
    """SIGTERM with no drain (as a crash or an OOM kill would do it, but with the rows flushed), under load.

    Requests already on the stopping instance fail (502, or the connection closed under the client); new ones
    are never sent there: a refused connection is retried on the other instance at once (nothing was sent), and
    the health check takes it out of rotation within fall x inter = 2 s. Every forwarded request keeps its row.
    """
    user = f"stop-{uuid.uuid4()}"
    _, second = deployment.instances
    load = Load(deployment.client(UNCAPPED, user), user)
    try:
        time.sleep(1)
        t_stop = time.monotonic()
        second.stop()
        stopped = time.monotonic()
        deployment.haproxy.wait_for({"metrion2": "DOWN"}, timeout=5)
        detected = time.monotonic() - t_stop
        before = load.ok
        time.sleep(0.5)
        assert load.ok > before + 10  # the other instance serves everything meanwhile
    finally:
        load.stop()
    assert len(load.failures) <= 4, load.failures  # 2 clients: at most one in flight and one connection each
    assert all(t_stop <= t <= stopped + 0.5 for t, _ in load.failures), (t_stop, stopped, load.failures)
    assert detected <= 3.5
    forwarded = sum(user.encode() in r.body for r in mock.received)
    wait_for(lambda: len(deployment.rows(user)) >= forwarded)  # the other writer's last batch
    rows = deployment.rows(user)
    answered = [r for r in rows if r["status"] == 200 and r["error"] is None]
    assert len(rows) == len({r["uid"] for r in rows})
    assert len(answered) <= forwarded <= len(rows) and forwarded >= load.ok  # each forwarded request: one row
    # A row beyond those: a request the stopping instance had admitted and could not send on before it went (an
    # error row, billed nothing); at most one per client.
    unsent = len(rows) - forwarded
    assert unsent <= 2 and len([r for r in rows if r["error"] and not r["cost_usd"]]) >= unsent, rows


def test_without_redis_haproxy_answers_a_json_503_and_the_instances_come_back(deployment: Deployment) -> None:
    """`on_failure: closed`: every instance's health turns 503, so none is left; HAProxy's own 503 is JSON.

    Instance 1 stands for every instance here: instance 2 is stopped (already, when the previous test ran on this
    pytest worker; xdist may run this one elsewhere, on a deployment of its own).
    """
    client = deployment.client(UNCAPPED, f"redis-{uuid.uuid4()}")
    deployment.instances[1].stop()
    deployment.haproxy.wait_for({"metrion1": "UP", "metrion2": "DOWN"}, timeout=8)
    deployment.redis.kill()
    deployment.haproxy.wait_for({"metrion1": "DOWN"}, timeout=5)
    with pytest.raises(openai.InternalServerError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 503 and refused.value.code == "metering_unavailable"
    deployment.redis.start()
    deployment.haproxy.wait_for({"metrion1": "UP"}, timeout=8)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
