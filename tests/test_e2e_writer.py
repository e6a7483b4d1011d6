"""The database writer through a real mitmdump: no value kills it, a refused row becomes a dead letter, counters
stay exact across restarts, and a second Metrion process on the same database refuses to start.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from harness import Proxy
from receivers import wait_for
from test_e2e_limits import TINY, tiny_plan

from metrion_addon import store
from metrion_addon.mock_provider import MockProvider

CAP = 3
CHAT = "/api/proxy/openai/v1/chat/completions"
RAW_PATH = b"GET /api/proxy/openai/v1/models\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def chat(proxy: Proxy, content: bytes | None = None, key: str = TINY, **headers: str) -> httpx.Response:
    body = content or json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    return httpx.post(f"{proxy.url}{CHAT}", content=body, timeout=30,
                      headers={"authorization": f"Bearer {key}", "content-type": "application/json", **headers})


def raw_status(proxy: Proxy, head: bytes) -> int:
    """Send bytes no HTTP client would (a raw \\xff in the path) and return the status of the answer."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        conn.sendall(head)
        answer = b""
        while b"\r\n" not in answer:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ")[1])


def monthly(proxy: Proxy) -> list[tuple]:
    with sqlite3.connect(proxy.db_path) as conn:
        return conn.execute("SELECT token_name, requests FROM monthly_usage").fetchall()


# Each trigger the issue found (and one more: a count too large for any integer column), the status the client
# gets, and what its row holds. The first two need no token at all.
TRIGGERS: dict[str, tuple[Callable[[Proxy], int], int, str, object]] = {
    "header_byte_without_token": (
        lambda p: httpx.get(f"{p.url}/api/proxy/openai/v1/models", headers={"x-metrion-user": b"caf\xe9"}).status_code,
        401, "requester", "caf\ufffd"),
    "raw_byte_in_path_without_token": (
        lambda p: raw_status(p, RAW_PATH),
        401, "path", "/api/proxy/openai/v1/models\ufffd"),
    "surrogate_in_request_model": (
        lambda p: chat(p, b'{"model": "gpt-4o\\ud800", "messages": [{"role": "user", "content": "hi"}]}').status_code,
        200, "model", "gpt-4o\ufffd"),
    "surrogate_in_reply_model": (
        lambda p: chat(p, **{"x-mock-scenario": "surrogate-model"}).status_code, 200, "model",
        "\ufffdgpt-4o-2024-08-06"),
    "usage_too_large_for_a_column": (
        lambda p: chat(p, **{"x-mock-scenario": "huge-usage"}).status_code, 200, "input_tokens", None),
}


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_no_value_stops_the_writer_and_counters_survive_a_restart(start_proxy, trigger: str) -> None:
    send, status, column, stored = TRIGGERS[trigger]
    proxy = start_proxy(**tiny_plan(CAP))
    assert send(proxy) == status
    statuses = [chat(proxy).status_code for _ in range(CAP + 1)]
    admitted = 1 if status == 200 else 0
    assert statuses == [200] * (CAP - admitted) + [429] * (1 + admitted)  # the cap holds: counted as before
    rows = proxy.rows(n=CAP + 2)
    assert len(rows) == CAP + 2  # every request left its row, the trigger's and all after it
    assert rows[0][column] == stored
    assert proxy.rows("status = 200", n=CAP)[-1]["model"].startswith("gpt-4o")

    proxy.restart()
    assert monthly(proxy) == [("tiny", CAP)]
    assert chat(proxy).status_code == 429  # the monthly count came back exact


def test_a_row_the_database_refuses_is_kept_as_a_dead_letter_and_later_rows_land(start_proxy,
                                                                                tmp_path: Path) -> None:
    database = tmp_path / "refusing.db"
    conn = store.connect(database)
    store.create_schema(conn)
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON requests WHEN NEW.model LIKE 'refused%' "
                 "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END")
    conn.close()
    proxy = start_proxy(database=str(database), **tiny_plan(10))
    body = json.dumps({"model": "refused-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert chat(proxy, body).status_code == 200
    assert [chat(proxy).status_code for _ in range(3)] == [200] * 3
    assert len(proxy.rows(n=3)) == 3
    proxy.stop()
    with sqlite3.connect(database) as check:
        error, row = check.execute("SELECT error, row FROM dead_letters").fetchone()
        assert check.execute("SELECT requests FROM monthly_usage").fetchone() == (4,)
    assert "refused by a trigger" in error
    assert json.loads(row)["model"] == "refused-model" and json.loads(row)["status"] == 200


def test_a_second_process_on_the_same_database_refuses_to_start_and_names_the_first(
        start_proxy, mock: MockProvider, tmp_path: Path) -> None:
    first = start_proxy(**tiny_plan(CAP))
    assert first.process is not None
    second = Proxy(tmp_path / "second", dict(first.config))
    with pytest.raises(RuntimeError, match="mitmdump exited"):
        second.start()
    log = second.log_path.read_text()
    said = [line for line in log.splitlines() if "in use by another" in line]
    assert len(said) == 1 and "Traceback" not in log and "listening" not in log
    assert f"database: {first.db_path} is in use by another Metrion process (pid {first.process.pid})" in said[0]
    assert said[0].endswith("keep limits in a shared store (`shared: {redis: ...}` in the config) to run several.")

    assert [chat(first).status_code for _ in range(CAP + 1)] == [200] * CAP + [429]
    assert wait_for(lambda: monthly(first) == [("tiny", CAP)])  # the last counter is written (within a batch)
    first.process.kill()  # kill -9: the operating system releases the lock
    first.process.wait()
    first.process = None
    second.start()
    try:
        assert chat(second).status_code == 429  # one set of limits, still exact
        assert monthly(second) == [("tiny", CAP)]
    finally:
        second.stop()


def test_kill_9_loses_at_most_the_last_batch_and_the_restart_counts_on(start_proxy, mock: MockProvider) -> None:
    """Rows and counters are committed every ~50 ms: a SIGKILL loses what was answered since, never older rows."""
    proxy = start_proxy(**tiny_plan(100_000))
    answered: list[tuple[str, float]] = []  # (requester, when its answer arrived)
    with httpx.Client(timeout=30) as client:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            who = f"kill9-{len(answered)}"
            response = client.post(f"{proxy.url}{CHAT}", json={
                "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, headers={
                "authorization": f"Bearer {TINY}", "x-metrion-user": who})
            assert response.status_code == 200
            answered.append((who, time.monotonic()))
    assert proxy.process is not None
    proxy.process.kill()  # SIGKILL right after an answer: nothing in flight, only the writer's batch at stake
    killed = time.monotonic()
    proxy.process.wait()
    proxy.process = None

    with sqlite3.connect(proxy.db_path) as conn:
        kept = {who for (who,) in conn.execute("SELECT requester FROM requests")}
    lost = [(who, killed - when) for who, when in answered if who not in kept]
    assert all(age < 1.0 for _, age in lost), lost  # only the newest rows; the README says ~50 ms, a loaded CI more
    assert [who for who, _ in answered[len(answered) - len(lost):]] == [who for who, _ in lost]  # a suffix

    proxy.start()
    ((_, counted),) = monthly(proxy)
    assert len(kept) <= counted <= len(answered)  # the counter was committed with (or ahead of) the rows
    assert chat(proxy).status_code == 200
    assert len(proxy.rows("requester IS NULL", n=1)) == 1  # writes go on after the restart
