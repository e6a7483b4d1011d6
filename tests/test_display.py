"""What mitmproxy's own outputs show of Metrion: the metering column in mitmweb, and the flows Metrion refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from harness import APP_TOKEN, ROOT, Proxy, base_config, free_port
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from mitmproxy.tools.web.webaddons import WebAddon

from metrion_addon.display import REJECTED_MARK, FlowDisplay, refusal_line, with_metering_column
from metrion_addon.mock_provider import MockProvider

WEB_DEFAULT = ["tls", "icon", "path", "method", "status", "size", "time"]


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (WEB_DEFAULT, [*WEB_DEFAULT, "comment"]),
        (["path", "comment", "status"], ["path", "comment", "status"]),
        ([], ["comment"]),
    ],
)
def test_the_metering_column_is_added_once(columns: list[str], expected: list[str]) -> None:
    assert with_metering_column(columns) == expected


def test_mitmweb_shows_the_metering_column_by_default() -> None:
    display = FlowDisplay()
    with taddons.context(WebAddon(), display) as tctx:
        display.running()

        assert tctx.options.web_columns == [*WEB_DEFAULT, "comment"]


@pytest.mark.parametrize("chosen", [["path", "status"], WEB_DEFAULT[:-1]])
def test_mitmweb_columns_the_user_chose_are_left_alone(chosen: list[str]) -> None:
    display = FlowDisplay()
    with taddons.context(WebAddon(), display) as tctx:
        tctx.options.update(web_columns=chosen)
        display.running()

        assert tctx.options.web_columns == chosen


def test_without_mitmweb_there_is_no_column_to_set() -> None:
    display = FlowDisplay()
    with taddons.context(display) as tctx:
        display.running()

        assert "web_columns" not in tctx.options


def refused(method: str, path: str, status: int, body: dict) -> http.HTTPFlow:
    flow = tflow.tflow(req=tutils.treq(method=method.encode(), path=path.encode(), host="api.openai.com", port=443))
    flow.response = http.Response.make(status, json.dumps(body))
    flow.marked = REJECTED_MARK
    return flow


@pytest.mark.parametrize(
    ("flow", "line"),
    [
        (
            refused("POST", "/v1beta/models/x:generateContent?key=AIza-secret", 401, {"error": {"message": "No."}}),
            "⛔ metrion refused POST /v1beta/models/x:generateContent: 401 No.",
        ),
        (
            refused("CONNECT", "", 407, {"error": {"message": "Send your token."}}),
            "⛔ metrion refused CONNECT api.openai.com:443: 407 Send your token.",
        ),
        (
            refused("GET", "/api/proxy/openai/v1/models", 429, {}),
            "⛔ metrion refused GET /api/proxy/openai/v1/models: 429",
        ),
    ],
)
def test_a_refusal_is_one_line_without_the_query_string(flow: http.HTTPFlow, line: str) -> None:
    assert refusal_line(flow) == line


def test_mitmdump_output_shows_each_refusal_with_its_marker(proxy: Proxy) -> None:
    offset = proxy.log_path.stat().st_size
    httpx.post(f"{proxy.url}/api/proxy/openai/v1/chat/completions?key=leak", headers={"x-api-key": "sk-nope"})
    time.sleep(0.3)

    log = proxy.log_path.read_text("utf-8")[offset:]
    assert "⛔ metrion refused POST /api/proxy/openai/v1/chat/completions: 401 " in log
    assert "leak" not in log and "sk-nope" not in log


def test_mitmweb_marks_refused_flows_and_shows_the_metering_column(mock: MockProvider, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(mock.base_url, tmp_path / "m.db")))
    port, web_port = free_port(), free_port()
    mitmweb = Path(sys.executable).parent / "mitmweb"
    process = subprocess.Popen(
        [str(mitmweb), "-s", str(ROOT / "metrion_addon" / "addon.py"), "--set", f"metrion_config={config}",
         "--set", f"confdir={tmp_path / 'confdir'}", "--listen-host", "127.0.0.1", "--listen-port", str(port),
         "--set", "connection_strategy=lazy", "--set", "web_open_browser=false", "--set", f"web_port={web_port}",
         "--set", "web_password=pw"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        web = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                options = httpx.get(f"{web}/options", params={"token": "pw"}).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "mitmweb did not start"
                time.sleep(0.1)
        proxy = f"http://127.0.0.1:{port}"
        httpx.post(f"{proxy}/api/proxy/openai/v1/chat/completions", headers={"authorization": "Bearer sk-bad"})
        httpx.get(f"{proxy}/api/proxy/openai/v1/models", headers={"authorization": f"Bearer {APP_TOKEN}"})
        time.sleep(0.5)
        flows = httpx.get(f"{web}/flows", params={"token": "pw"}).json()
    finally:
        process.terminate()
        process.wait(15)

    assert options["web_columns"]["value"] == [*WEB_DEFAULT, "comment"]
    by_status = {flow["response"]["status_code"]: flow for flow in flows}
    assert by_status[401]["marked"] == "⛔"
    assert "Missing Metrion token" in by_status[401]["comment"]
    assert by_status[200]["marked"] == ""
    assert by_status[200]["comment"].startswith("openai · ")
