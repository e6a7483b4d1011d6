"""The private Redis and PostgreSQL servers the shared-state tests drive: started, killed, back on one port."""

from __future__ import annotations

import psycopg
import pytest
import redis


def test_redis_server_loses_its_data_when_killed_and_comes_back_on_the_same_port(start_redis) -> None:
    server = start_redis()
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    client.set("k", "v")
    assert client.get("k") == b"v"
    server.kill()
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    server.start()
    assert client.get("k") is None


def test_postgres_cluster_keeps_committed_rows_across_a_crash_and_restart(postgres) -> None:
    url = postgres.create_database("servers_test")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
    postgres.kill()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    postgres.start()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT sum(x) FROM t").fetchone() == (3,)
