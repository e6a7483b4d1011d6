"""The dashboard in a real browser (Debian's chromium through Playwright) over traffic sent through a real proxy.

Each page must render the database's numbers, filters and pagination must change them, and the console must stay
clean. Screenshots of every page are kept as test artefacts (see the `shots` fixture).
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from harness import APP_TOKEN, ROOT, Proxy, free_port
from playwright.sync_api import Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
METRION = Path(sys.executable).parent / "metrion"
PEOPLE = ["alice", "bob", "carol"]


def send_traffic(proxy: Proxy) -> None:
    """62 OpenAI requests from three requesters, 4 Mistral ones, 2 provider errors and 1 refused by Metrion."""
    refused = httpx.post(f"{proxy.url}/api/proxy/openai/v1/chat/completions",
                         headers={"authorization": "Bearer sk-metrion-" + "5" * 32},
                         json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 401 and refused.headers["x-metrion-error"]
    for provider, model, count in (("openai", "gpt-4o-mini", 62), ("mistral", "mistral-large-latest", 4)):
        client = openai.OpenAI(base_url=f"{proxy.url}/api/proxy/{provider}/v1", api_key=APP_TOKEN, max_retries=0)
        for i in range(count):
            client.with_options(default_headers={"x-metrion-user": PEOPLE[i % 3]}).chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"hello number {i}"}])
    for _ in range(2):
        response = httpx.post(f"{proxy.url}/api/proxy/openai/v1/chat/completions",
                              headers={"authorization": f"Bearer {APP_TOKEN}", "x-mock-scenario": "error-500"},
                              json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 500


@pytest.fixture(scope="module")
def site(mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from harness import base_config

    workdir = tmp_path_factory.mktemp("dashboard")
    proxy = Proxy(workdir, base_config(mock.base_url, workdir / "metrion.db")).start()
    try:
        send_traffic(proxy)
        assert len(proxy.rows(n=69)) == 69
    finally:
        proxy.stop()
    port = free_port()
    server = subprocess.Popen([str(METRION), "dashboard", "--config", str(workdir / "config.yaml"), "--port",
                               str(port)], stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        line = server.stderr.readline()
        assert "dashboard at http://127.0.0.1" in line, line
        yield f"http://127.0.0.1:{port}", workdir
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="session")
def shots() -> Path:
    """Where the screenshots go, kept after the run as test artefacts: $METRION_TEST_ARTIFACTS/dashboard, by default
    test-artifacts/dashboard in the checkout (git-ignored)."""
    path = Path(os.environ.get("METRION_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    opened.on("pageerror", lambda error: problems.append(str(error)))
    opened.problems = problems  # type: ignore[attr-defined]
    yield opened
    context.close()
    assert problems == [], problems


def db(workdir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(workdir / "metrion.db") as conn:
        return conn.execute(sql).fetchall()


def card(page: Page, title: str):
    return page.get_by_role("article", name=title, exact=True)


def test_overview_shows_the_databases_totals_and_draws_every_chart(site, page: Page, shots: Path) -> None:
    url, workdir = site
    [(requests, errors, cost, requesters)] = db(workdir, "SELECT count(*), sum(status >= 400), sum(cost_usd), "
                                                         "count(DISTINCT requester) FROM requests")
    page.goto(url)
    expect(page.get_by_role("link", name="Overview")).to_have_attribute("aria-current", "page")
    expect(card(page, "Requests").locator(".value")).to_have_text(str(requests))
    expect(card(page, "Requests")).to_contain_text(f"{requests - errors} ok · {errors} errors")
    expect(card(page, "Requesters").locator(".value")).to_have_text(str(requesters))
    expect(card(page, "Error rate").locator(".value")).to_have_text(f"{errors / requests * 100:.1f} %")
    shown_cost = card(page, "Cost").locator(".value").inner_text()
    assert float(shown_cost.lstrip("$").replace(",", "")) == pytest.approx(cost, rel=1e-3, abs=1e-6)
    for chart in ("Requests over time", "Tokens over time", "Cost by model", "Top models by requests"):
        canvas = page.get_by_role("img", name=chart, exact=True)
        expect(canvas).to_be_visible()
        assert canvas.evaluate("c => Chart.getChart(c) !== undefined")
    expect(page.get_by_role("list", name="Cost share by provider")).to_contain_text("openai")
    page.screenshot(path=shots / "overview.png", full_page=True)


def test_a_filter_narrows_the_numbers_and_lives_in_the_url(site, page: Page) -> None:
    url, workdir = site
    [(mistral,)] = db(workdir, "SELECT count(*) FROM requests WHERE provider = 'mistral'")
    page.goto(url)
    page.get_by_label("Provider", exact=True).select_option("mistral")
    page.wait_for_url(re.compile(r"provider=mistral"))
    expect(card(page, "Requests").locator(".value")).to_have_text(str(mistral))
    page.goto(f"{url}/costs?provider=mistral")
    expect(page.get_by_label("Provider", exact=True)).to_have_value("mistral")
    expect(page.get_by_role("table", name="Cost by model")).to_contain_text("mistral-large-latest")
    expect(page.get_by_role("table", name="Cost by model")).not_to_contain_text("gpt-4o-mini")


def test_logs_page_through_fifty_at_a_time_and_open_a_row(site, page: Page, shots: Path) -> None:
    url, workdir = site
    [(total,)] = db(workdir, "SELECT count(*) FROM requests")
    [(newest_model, newest_status)] = db(workdir, "SELECT model, status FROM requests ORDER BY ts DESC, id DESC "
                                                  "LIMIT 1")
    page.goto(f"{url}/logs")
    expect(page.get_by_role("status")).to_have_text(f"Requests 1–50 of {total}")
    rows = page.get_by_role("table", name="Requests").locator("tbody tr")
    expect(rows).to_have_count(50)
    expect(rows.first).to_contain_text(newest_model)
    header = page.get_by_role("table", name="Requests").locator("thead")
    for column in ("Status", "Time", "Requester", "Provider", "Model", "Input", "Output", "Total", "Cost", "Latency",
                   "TTFB", "Usage", "Error"):
        expect(header).to_contain_text(column)
    colour = "e => getComputedStyle(e).backgroundColor"
    failed, answered = rows.nth(0).locator(".status"), rows.nth(2).locator(".status")  # a 500, then a 200
    expect(failed).to_have_text("500")
    expect(answered).to_have_text("200")
    assert failed.evaluate(colour) != answered.evaluate(colour)
    page.screenshot(path=shots / "logs.png", full_page=True)
    page.get_by_role("link", name="Next →").click()
    expect(page.get_by_role("status")).to_have_text(f"Requests 51–{total} of {total}")
    expect(rows).to_have_count(total - 50)
    page.get_by_role("link", name="← Previous").click()
    expect(page.get_by_role("status")).to_have_text(f"Requests 1–50 of {total}")
    rows.first.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("usage_source")
    expect(dialog).to_contain_text(str(newest_status))
    page.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()
    page.get_by_label("Status", exact=True).select_option("5xx")
    expect(page.get_by_role("status")).to_have_text("Requests 1–2 of 2")


def test_every_page_renders_its_numbers_without_console_errors(site, page: Page, shots: Path) -> None:
    url, workdir = site
    [(errors, own)] = db(workdir, "SELECT count(*), count(*) FILTER (WHERE ttfb_ms IS NULL) FROM requests "
                                  "WHERE status >= 400")
    assert own == 1  # the unknown token: Metrion answered it, no provider was asked
    page.goto(f"{url}/errors")
    expect(card(page, "Errors").locator(".value")).to_have_text(str(errors))
    expect(card(page, "Metrion's own errors").locator(".value")).to_have_text(str(own))
    expect(card(page, "Provider errors").locator(".value")).to_have_text(str(errors - own))
    expect(page.get_by_role("table", name="Errors by status")).to_contain_text("401")
    expect(page.get_by_role("table", name="Most recent errors").locator("tbody tr")).to_have_count(errors)
    page.screenshot(path=shots / "errors.png", full_page=True)
    page.goto(f"{url}/costs")
    [(cost, requests)] = db(workdir, "SELECT sum(cost_usd), count(*) FROM requests")
    shown_cost = card(page, "Cost in the period").locator(".value").inner_text()
    assert float(shown_cost.lstrip("$").replace(",", "")) == pytest.approx(cost, rel=1e-3, abs=1e-6)
    expect(card(page, "Cost in the period")).to_contain_text(f"{requests} requests")
    by_model = page.get_by_role("table", name="Cost by model")
    for (model,) in db(workdir, "SELECT DISTINCT model FROM requests WHERE model IS NOT NULL"):
        expect(by_model).to_contain_text(model)
    page.screenshot(path=shots / "costs.png", full_page=True)
    page.goto(f"{url}/latency")
    [(slowest, timed)] = db(workdir, "SELECT max(latency_ms), count(latency_ms) FROM requests")
    expect(card(page, "p99 latency").locator(".value")).not_to_have_text("—")
    assert page.get_by_role("img", name="Latency histogram").evaluate("c => Chart.getChart(c).data.datasets[0]"
                                                                      ".data.reduce((a, b) => a + b, 0)") == timed
    assert slowest > 0
    page.screenshot(path=shots / "latency.png", full_page=True)
    page.goto(f"{url}/tokens")
    tokens = page.get_by_role("table", name="Metrion tokens")
    expect(tokens.get_by_role("row", name=re.compile("^app "))).to_contain_text("68 / unlimited")
    expect(tokens).not_to_contain_text(APP_TOKEN)
    page.screenshot(path=shots / "tokens.png", full_page=True)


def test_a_narrow_window_keeps_everything_reachable(site, browser, shots: Path) -> None:
    url, _ = site
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(url)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways: {width}px"
    expect(card(page, "Requests")).to_be_visible()
    page.get_by_role("link", name="Logs").click()
    expect(page.get_by_role("status")).to_contain_text("Requests 1–50")
    page.screenshot(path=shots / "narrow-logs.png", full_page=True)
    context.close()


