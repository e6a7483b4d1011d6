"""Shared fixtures: the mock upstream (one per session) and real mitmdump processes running the addon."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from harness import Proxy, base_config
from servers import PostgresServer, RedisServer

from metrion_addon.mock_provider import MockProvider

_names = itertools.count()


@pytest.fixture(scope="session")
def mock() -> Iterator[MockProvider]:
    upstream = MockProvider()
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def proxy(mock: MockProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The shared proxy: pro-plan tokens, generous rate limit, all five providers on the mock."""
    workdir = tmp_path_factory.mktemp("proxy")
    running = Proxy(workdir, base_config(mock.base_url, workdir / "metrion.db")).start()
    yield running
    running.stop()


@pytest.fixture
def start_proxy(mock: MockProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Proxy]]:
    """Start a proxy of the test's own, with config overrides; stopped after the test."""
    started: list[Proxy] = []

    def start(env: dict[str, str] | None = None, options: tuple[str, ...] | None = None, **overrides: object) -> Proxy:
        """`options` replaces the mitmproxy options the harness sets (connection_strategy=lazy)."""
        workdir = tmp_path_factory.mktemp(f"proxy{next(_names)}")
        config = base_config(mock.base_url, workdir / "metrion.db", **overrides)
        running = Proxy(workdir, config, env=env or {}, **({} if options is None else {"options": options})).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def start_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisServer]]:
    """Start private redis-servers for the test (killable, restartable on their port); all stopped after."""
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp(f"redis{next(_names)}")).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One private PostgreSQL cluster for the session; tests get their own database in it."""
    server = PostgresServer().start()
    yield server
    server.remove()


@pytest.fixture
def postgres(postgres_cluster: PostgresServer) -> Iterator[PostgresServer]:
    """The session's cluster, running (restarted if a test stopped it) and running again after the test."""
    if not (postgres_cluster.datadir / "data" / "postmaster.pid").exists():
        postgres_cluster.start()
    yield postgres_cluster
    if not (postgres_cluster.datadir / "data" / "postmaster.pid").exists():
        postgres_cluster.start()
