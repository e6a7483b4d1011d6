"""The addon's hooks called directly (taddons): what mitmweb shows, what is redacted, what runs off the loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mitmproxy import exceptions, flowfilter, http
from mitmproxy.addons.view import View
from mitmproxy.test import taddons, tflow, tutils

from metrion_addon.addon import Metrion
from metrion_addon.clock import iso_utc

TOKEN = "sk-metrion-" + "c" * 32
ANSWER = {"id": "x", "model": "gpt-4o-2024-08-06", "choices": [{"message": {"content": "hi"}}],
          "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def write_config(tmp_path: Path, **overrides: object) -> Path:
    config = {"database": str(tmp_path / "m.db"), "tokens": [
        {"name": "app", "token": TOKEN, "plan": "free", "keys": {"openai": "sk-stored-openai"}}], **overrides}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def chat_flow(stream: bool = False) -> http.HTTPFlow:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    request = tutils.treq(method=b"POST", path=b"/api/proxy/openai/v1/chat/completions", host="127.0.0.1", port=8080,
                          headers=http.Headers(authorization=f"Bearer {TOKEN}", content_type="application/json",
                                               x_metrion_user="web-ui"),
                          content=json.dumps(body).encode())
    return tflow.tflow(req=request)


@contextlib.contextmanager
def configured(tmp_path: Path, addon: Metrion | None = None, *others: object) -> Iterator[Metrion]:
    """`addon` (a new Metrion by default) configured with write_config(tmp_path), in a taddons context whose other
    addons `others` come before it."""
    addon = addon or Metrion()
    with taddons.context(*others, addon) as tctx:
        tctx.configure(addon, metrion_config=str(write_config(tmp_path)))
        yield addon


def run(coroutine_function) -> None:
    asyncio.run(coroutine_function())


def test_metered_flow_is_annotated_for_mitmweb_and_its_secrets_redacted(tmp_path: Path) -> None:
    async def scenario() -> None:
        # with mitmweb's flow view: the cost is shown once priced
        with configured(tmp_path, Metrion(clock=lambda: 1_795_000_000.0), View()) as addon:
            addon.running()
            flow = chat_flow()
            addon.request(flow)
            assert flow.request.url == "https://api.openai.com/v1/chat/completions"
            assert flow.request.headers["authorization"] == "Bearer sk-stored-openai"
            assert "x-metrion-user" not in flow.request.headers
            flow.response = tutils.tresp(content=json.dumps(ANSWER).encode(),
                                         headers=http.Headers(content_type="application/json"))
            addon.responseheaders(flow)
            assert flow.request.headers["authorization"] == "Bearer [redacted]"
            assert flow.response.headers["x-metrion-quota-remaining"] == "9999"
            addon.response(flow)
            meta = flow.metadata["metrion"]
            assert (meta["token"], meta["requester"], meta["input_tokens"], meta["output_tokens"]) == (
                "app", "web-ui", 11, 7)
            assert flow.comment.startswith("openai · gpt-4o-2024-08-06 · 11 in / 7 out")
            addon.done()
            await asyncio.sleep(0)  # the writer's annotation callback lands on the loop
            assert "$" in flow.comment and flow.metadata["metrion"]["cost_usd"] > 0

    run(scenario)


def test_rejected_flow_is_marked_and_the_token_never_shown(tmp_path: Path) -> None:
    async def scenario() -> None:
        with configured(tmp_path) as addon:
            flow = chat_flow()
            flow.request.headers["authorization"] = "Bearer sk-metrion-" + "d" * 32
            addon.request(flow)
            assert flow.response.status_code == 401 and flow.marked == ":no_entry:"
            assert flow.request.headers["authorization"] == "Bearer [redacted]"
            addon.response(flow)
            assert flow.metadata["metrion"]["status"] == 401 and "Unknown Metrion token" in flow.comment
            for expression in ("~meta metrion", "~meta \"'status': 401\"", "~marker no_entry", "~comment Unknown"):
                assert flowfilter.match(expression, flow), expression  # the filters the README suggests
            addon.done()

    run(scenario)


def test_a_failing_database_refuses_new_requests_with_503_and_counts_them_without_rows(tmp_path: Path) -> None:
    async def scenario() -> None:
        with configured(tmp_path) as addon:
            writer = addon.runtime.writer
            writer.error = "database or disk is full"
            flow = chat_flow()
            addon.request(flow)
            assert flow.response.status_code == 503
            assert "database write failed" in json.loads(flow.response.content)["error"]["message"]
            addon.response(flow)
            assert writer.rejected_while_failing == 1
            writer.error = None
            addon.done()

    run(scenario)
    with sqlite3.connect(tmp_path / "m.db") as conn:
        assert conn.execute("SELECT status FROM requests").fetchall() == []


def test_sqlite_and_pricing_never_run_on_the_event_loop_thread(tmp_path: Path) -> None:
    threads: set[int] = set()

    async def scenario() -> None:
        with configured(tmp_path) as addon:
            addon.running()
            addon.runtime.writer._backend._conn.set_trace_callback(lambda sql: threads.add(threading.get_ident()))
            price = addon.runtime.writer._price
            addon.runtime.writer._price = lambda record: (threads.add(threading.get_ident()), price(record))[1]
            for _ in range(20):
                flow = chat_flow()
                addon.request(flow)
                flow.response = tutils.tresp(content=json.dumps(ANSWER).encode())
                addon.responseheaders(flow)
                addon.response(flow)
            writer_thread = addon.runtime.writer._thread
            addon.done()
            assert threads == {writer_thread.ident}

    run(scenario)


def test_bad_config_stops_start_up_with_one_line(tmp_path: Path) -> None:
    async def scenario() -> None:
        addon = Metrion()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, metrion_config=str(write_config(tmp_path)))
            bad = tmp_path / "bad"
            bad.mkdir()
            with pytest.raises(exceptions.OptionsError, match=r"^metrion: .*config\.yaml: timeout: "):
                tctx.configure(addon, metrion_config=str(write_config(bad, timeout="soon")))
            addon.done()

    run(scenario)


def test_shutdown_records_requests_still_in_flight(tmp_path: Path) -> None:
    async def scenario() -> None:
        with configured(tmp_path, Metrion(clock=lambda: 1_795_000_000.0)) as addon:
            addon.request(chat_flow())
            addon.done()

    run(scenario)
    with sqlite3.connect(tmp_path / "m.db") as conn:
        ((ts, error),) = conn.execute("SELECT ts, error FROM requests").fetchall()
    assert ts == iso_utc(1_795_000_000.0) and error == "Metrion shut down before the request finished"
