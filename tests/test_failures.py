"""Metrion's own failures and upstream failures, decided without a proxy: a 500 before forwarding, the row after,
a note mid-answer; 504 for a silent provider, 502 for an unreachable one."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from mitmproxy import http
from mitmproxy.test import tutils
from test_addon import TOKEN, chat_flow, configured, run


def rows(tmp_path: Path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "m.db") as conn:
        return conn.execute("SELECT status, error FROM requests ORDER BY id").fetchall()


def test_a_failure_before_forwarding_is_a_provider_shaped_500_without_metrion_headers_or_secrets(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        with configured(tmp_path) as addon:
            flow = chat_flow()
            flow.request.path += "?key=AIza-secret-123456"
            addon.failures.contain("request", flow, "KeyError at gate.py:1")
            assert flow.response is not None and flow.response.status_code == 500
            error = json.loads(flow.response.content)["error"]
            assert error["code"] == "metrion_internal_error" and "KeyError at gate.py:1" in error["message"]
            assert not any(name.lower().startswith(b"x-metrion-") for name, _ in flow.request.headers.fields)
            assert flow.request.headers["authorization"] == "Bearer [redacted]"
            assert "AIza" not in flow.request.path and TOKEN not in str(flow.request.headers)
            addon.response(flow)
            addon.done()

    run(scenario)
    ((status, error),) = rows(tmp_path)
    assert status == 500 and "KeyError at gate.py:1" in error


def test_a_failure_in_the_final_hook_still_leaves_the_row(tmp_path: Path) -> None:
    async def scenario() -> None:
        with configured(tmp_path) as addon:
            flow = chat_flow()
            addon.request(flow)
            flow.response = tutils.tresp(content=b"{}", headers=http.Headers(content_type="application/json"))
            addon.failures.contain("response", flow, "ValueError at recording.py:1")
            assert flow.id not in addon.recorder.exchanges
            addon.done()

    run(scenario)
    ((status, error),) = rows(tmp_path)
    assert status == 200 and "ValueError at recording.py:1" in error


def test_a_failure_mid_answer_is_noted_and_the_answer_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        with configured(tmp_path) as addon:
            flow = chat_flow()
            addon.request(flow)
            addon.failures.contain("responseheaders", flow, "TypeError at sse.py:1")
            assert flow.response is None and addon.recorder.exchanges[flow.id].internal_error == "TypeError at sse.py:1"
            addon.done()

    run(scenario)


def test_a_silent_provider_gets_504_and_an_unreachable_one_502(tmp_path: Path) -> None:
    async def scenario() -> None:
        with configured(tmp_path) as addon:
            silent, unreachable, unknown = chat_flow(), chat_flow(), chat_flow()
            addon.request(silent)
            addon.request(unreachable)
            addon.recorder.exchanges[silent.id].timed_out = True
            timed_out = addon.timeouts._answer_upstream_failure(silent, "connection closed")
            refused = addon.timeouts._answer_upstream_failure(unreachable, "Connection refused")
            assert timed_out is not None and timed_out.status_code == 504
            assert refused is not None and refused.status_code == 502
            assert "Connection refused" in json.loads(refused.content)["error"]["message"]
            assert addon.timeouts._answer_upstream_failure(unknown, "x") is None  # not Metrion's: mitmproxy answers
            addon.done()

    run(scenario)
