"""The dashboard's JSON endpoints over a database of known rows: every figure, empty periods, unknown prices,
pagination, the filters in the URL, the password, and no secret anywhere."""

from __future__ import annotations

import base64
import html
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient

from metrion_addon import queries, report, store
from metrion_addon.config import load_config
from metrion_addon.dashboard import pages
from metrion_addon.dashboard.access import hash_password, password_matches, refuse_open_bind
from metrion_addon.dashboard.app import create_app
from metrion_addon.queries import Filters, grouped
from metrion_addon.store import RequestRecord

NOW = datetime(2026, 11, 20, 12, 30, tzinfo=UTC)
SECRET_TOKEN = "sk-metrion-" + "c" * 32
SECRET_KEY = "sk-stored-openai-secret-key"


def row(ts: str, model: str | None = "gpt-4o", provider: str = "openai", status: int | None = 200,
        token: str | None = "app", requester: str | None = "alice", **fields: object) -> RequestRecord:
    return RequestRecord(ts=f"2026-{ts}.000Z", token_name=token, requester=requester, provider=provider, model=model,
                         path="/api/proxy/openai/v1/chat/completions", method="POST", stream=False, status=status,
                         **fields)


ROWS = [
    row("11-20T10:15:00", input_tokens=100, output_tokens=50, cache_read_tokens=20, total_tokens=150,
        cost_usd=0.00125, latency_ms=800.0, ttfb_ms=100.0),
    row("11-20T11:45:00", "claude-sonnet-4", "anthropic", requester="bob", input_tokens=1000, output_tokens=200,
        total_tokens=1200, cost_usd=0.006, latency_ms=1500.0, ttfb_ms=300.0),
    row("11-20T12:05:00", "ft:unpriced", token="ci", requester=None, input_tokens=10, output_tokens=5,
        total_tokens=15, latency_ms=400.0, ttfb_ms=50.0),
    row("11-20T12:10:00", status=429, error="rate limit: 100 requests a minute", latency_ms=1.0),
    row("11-20T09:00:00", status=500, error="Internal server error", latency_ms=300.0, ttfb_ms=290.0),
    row("11-19T11:00:00", input_tokens=40, output_tokens=10, total_tokens=50, cost_usd=0.001, latency_ms=700.0,
        ttfb_ms=90.0),
    row("10-25T08:00:00", input_tokens=4000, output_tokens=1000, total_tokens=5000, cost_usd=0.5,
        latency_ms=900.0, ttfb_ms=80.0),
]


def write(path: Path, rows: list[RequestRecord]) -> None:
    conn = store.connect(path)
    store.create_schema(conn)
    writer = store.Writer(store.SQLiteBackend(conn), batch_seconds=0)
    writer.start()
    for record in rows:
        writer.put(record)
    writer.put(store.MonthlyCount("app", "2026-11", 9500))
    writer.put(store.BucketState("app", 0.2, NOW.timestamp()))
    writer.close()


def config_file(tmp_path: Path, db: Path, **dashboard: str) -> Path:
    config = {
        "database": str(db),
        "plans": {"free": {"monthly_requests": 10000}, "pro": {"monthly_requests": None}},
        "tokens": [{"name": "app", "token": SECRET_TOKEN, "plan": "free", "keys": {"openai": SECRET_KEY}},
                   {"name": "ci", "token": "sk-metrion-" + "d" * 32, "plan": "pro"}],
    }
    if dashboard:
        config["dashboard"] = dashboard
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dashboard(tmp_path: Path) -> TestClient:
    """The dashboard over tmp_path/m.db, its clock at NOW."""
    return TestClient(create_app(load_config(config_file(tmp_path, tmp_path / "m.db")), clock=NOW.timestamp))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    tmp_path = tmp_path_factory.mktemp("dash")
    write(tmp_path / "m.db", ROWS)
    return dashboard(tmp_path)


def get(client: TestClient, page: str, **params: str) -> dict:
    response = client.get(f"/api/{page}", params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def log_pages(client: TestClient, **filters: str) -> list[dict]:
    """Every page of the Logs endpoint, newest first, following each page's `older` link."""
    pages, params = [], dict(filters)
    while True:
        pages.append(page := get(client, "logs", **params))
        if not page["older"]:
            return pages
        params = {**filters, "older": page["older"], "from": str(page["last"])}


@pytest.mark.parametrize(
    ("params", "requests", "errors", "cost", "previous_requests", "requesters"),
    [
        ({}, 5, 2, 0.00725, 1, 2),  # last 24 h: every row of the 20th; the 19th's row is the previous period
        ({"period": "1h"}, 3, 1, 0.006, 0, 2),
        ({"period": "month"}, 6, 2, 0.00825, 1, 2),  # November so far; the 19 days before hold Oct 25's row
        ({"provider": "anthropic"}, 1, 0, 0.006, 0, 1),
        ({"status": "5xx"}, 1, 1, None, 0, 1),
        ({"token": "ci"}, 1, 0, None, 0, 0),  # an unpriced model: cost unknown, not $0
        ({"requester": "alice", "period": "7d"}, 4, 2, 0.00225, 0, 1),
        ({"period": "custom", "since": "2026-01-01", "until": "2026-01-02"}, 0, 0, None, 0, 0),  # empty period
    ],
)
def test_overview_cards_count_the_rows_the_filters_select(client, params, requests, errors, cost,
                                                           previous_requests, requesters) -> None:
    cards = get(client, "overview", **params)["cards"]
    assert cards["requests"]["value"] == requests
    assert cards["errors"]["value"] == errors
    assert cards["successes"]["value"] == requests - errors
    assert cards["cost_usd"]["value"] == (pytest.approx(cost) if cost is not None else None)
    assert cards["requests"]["previous"] == previous_requests
    assert cards["requesters"]["value"] == requesters


def test_overview_cards_compare_with_the_previous_period_and_charts_fill_every_hour(client) -> None:
    data = get(client, "overview")
    cards = data["cards"]
    assert cards["requests"]["change"] == 4.0  # 5 against 1: +400 %
    assert cards["input_tokens"]["value"] == 1110 and cards["cached_tokens"]["value"] == 20
    assert cards["error_rate"]["value"] == pytest.approx(0.4)
    assert cards["latency_p95_ms"]["value"] == 1500.0 and data["percentiles"] == "exact"
    assert data["bucket"] == "hour" and len(data["labels"]) == 25 and data["labels"][-1] == "2026-11-20T12"
    assert sum(data["requests"]["successes"]) == 3 and sum(data["requests"]["errors"]) == 2
    assert data["requests"]["errors"][data["labels"].index("2026-11-20T09")] == 1
    shares = {entry["provider"]: entry["share"] for entry in data["cost_by_provider"]}
    assert shares["anthropic"] == pytest.approx(0.006 / 0.00725)
    assert data["top_models"][0] == {"model": "gpt-4o", "requests": 3}


def test_long_periods_are_charted_by_day_and_big_ones_estimate_percentiles(client, monkeypatch) -> None:
    assert get(client, "overview", period="30d")["percentiles"] == "exact"  # 7 rows
    monkeypatch.setattr(queries, "RAW_PERCENTILE_ROWS", 5)
    data = get(client, "overview", period="30d")
    assert data["bucket"] == "day" and data["labels"][-1] == "2026-11-20" and len(data["labels"]) == 31
    assert data["cards"]["requests"]["value"] == 7 and data["percentiles"] == "estimated"
    assert data["cards"]["latency_p95_ms"]["value"] == pytest.approx(1500, rel=0.045)


@pytest.mark.parametrize(
    ("params", "rows_limit", "source", "p95"),
    [
        ({"status": "5xx"}, 20_000, "estimated", pytest.approx(300, rel=0.045)),  # no index reaches a status
        ({"status": "5xx", "provider": "openai"}, 20_000, "exact", 300.0),
        ({"requester": "alice"}, 20_000, "exact", 800.0),
        ({"requester": "alice"}, 1, "unavailable", None),  # too many for the raw rows, and no histogram has it
        ({"token": "app"}, 1, "estimated", pytest.approx(1500, rel=0.045)),
    ],
)
def test_percentiles_come_from_raw_rows_histograms_or_nowhere(client, monkeypatch, params, rows_limit, source,
                                                               p95) -> None:
    monkeypatch.setattr(queries, "RAW_PERCENTILE_ROWS", rows_limit)
    data = get(client, "latency", **params)
    assert data["percentiles"] == source and data["overall"]["p95"] == p95
    assert client.get("/latency", params=params).status_code == 200


def test_latency_page_percentiles_by_model_and_histogram(client) -> None:
    data = get(client, "latency")
    assert data["overall"]["p50"] == 400.0 and data["overall"]["p99"] == 1500.0
    assert data["overall"]["ttfb_avg_ms"] == pytest.approx((100 + 300 + 50 + 290) / 4, abs=0.1)
    rows = {(r["provider"], r["model"]): r for r in data["by_model"]}
    assert rows[("openai", "gpt-4o")]["requests"] == 3 and rows[("openai", "gpt-4o")]["p50"] == 300.0
    assert sum(b["requests"] for b in data["histogram"]) == 5
    assert data["histogram"][0] == {"from_ms": 0, "to_ms": 2, "requests": 1}  # the 1 ms rate-limit answer


def test_errors_page_tells_metrions_own_errors_from_the_providers(client) -> None:
    data = get(client, "errors")
    assert (data["errors"], data["metrion_errors"], data["provider_errors"]) == (2, 1, 1)
    assert {(r["status"], r["origin"]) for r in data["by_status"]} == {(429, "metrion"), (500, "provider")}
    assert [r["status"] for r in data["recent"]] == [429, 500]  # newest first
    assert set(data["series"]) == {"429 (Metrion)", "500 (provider)"}


def test_costs_page_groups_cost_and_compares_the_month_with_the_last(client) -> None:
    data = get(client, "costs")
    assert data["total"]["cost_usd"] == pytest.approx(0.00725) and data["total"]["unpriced"] == 3
    models = {r["name"]: r for r in data["tables"]["model"]}
    assert models["ft:unpriced"]["cost_usd"] is None and models["claude-sonnet-4"]["cost_usd"] == 0.006
    assert {r["name"] for r in data["tables"]["requester"]} == {"alice", "bob", None}
    month = data["month"]
    assert month["this_month"] == "2026-11" and month["so_far_usd"] == pytest.approx(0.00825)
    assert month["last_month_usd"] == 0.5 and month["last_month_same_point_usd"] is None  # Oct 25 is after Oct 20


def test_tokens_page_shows_plan_cap_and_rate_state_by_name_only(client) -> None:
    tokens = {r["token"]: r for r in get(client, "tokens")}
    app = tokens["app"]
    assert (app["requests"], app["cap"], app["remaining"], app["resets"]) == (9500, 10000, 500, "2026-12-01")
    assert app["rate_limited"] and app["rate_available"] == 0 and app["period_requests"] == 4
    assert tokens["ci"]["cap"] is None and not tokens["ci"]["rate_limited"]


def test_tokens_page_reads_the_rate_state_from_redis_when_limits_are_shared(tmp_path: Path, start_redis) -> None:
    import redis

    from metrion_addon.shared_limits import bucket_key

    server = start_redis()
    write(tmp_path / "m.db", ROWS[:1])  # its rate_buckets say app's bucket is empty; with shared limits, Redis rules
    path = config_file(tmp_path, tmp_path / "m.db")
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "shared": {"redis": server.url}}))
    redis.Redis.from_url(server.url).hset(bucket_key("ci"), mapping={"tokens": "0.4", "updated": NOW.timestamp()})
    client = TestClient(create_app(load_config(path), clock=NOW.timestamp))
    tokens = {r["token"]: r for r in get(client, "tokens")}
    assert (tokens["ci"]["rate_limited"], tokens["ci"]["rate_available"]) == (True, 0)
    assert (tokens["app"]["rate_limited"], tokens["app"]["rate_available"]) == (False, 100)  # no bucket: idle, full
    server.kill()
    tokens = {r["token"]: r for r in get(client, "tokens")}
    assert tokens["ci"]["rate_limited"] is None and tokens["ci"]["rate_available"] is None
    assert tokens["ci"]["cap"] is None and tokens["app"]["requests"] == 9500  # the rest still comes from the log
    assert "Redis did not answer" in client.get("/tokens").text


def test_no_page_or_endpoint_shows_a_token_or_key(client) -> None:
    for page in ("overview", "logs", "latency", "errors", "costs", "tokens"):
        for url in (f"/api/{page}", "/" if page == "overview" else f"/{page}"):
            body = client.get(url, params={"period": "30d"}).text
            assert SECRET_TOKEN not in body and SECRET_KEY not in body and "c" * 32 not in body


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"period": "week"}, "unknown period 'week'"),
        ({"provider": "openia"}, "unknown provider 'openia'"),
        ({"status": "2x"}, "not a status"),
        ({"period": "custom", "since": "yesterday"}, "not a time"),
        ({"period": "custom", "since": "2026-11-20", "until": "2026-11-19"}, "ends before it starts"),
    ],
)
def test_bad_filters_are_a_400_with_the_reason(client, params, message) -> None:
    response = client.get("/api/overview", params=params)
    assert response.status_code == 400 and message in response.json()["error"]
    page = client.get("/", params=params)
    assert page.status_code == 400 and message in html.unescape(page.text)


def test_logs_pages_by_50_newest_first_without_gaps_or_repeats(tmp_path: Path) -> None:
    rows = [row(f"11-20T{10 + i // 60:02d}:{i % 60:02d}:00", input_tokens=i) for i in range(120)]
    rows += [row("11-20T11:59:00", input_tokens=1000 + i) for i in range(3)]  # same ts: the id breaks the tie
    write(tmp_path / "m.db", rows)
    client = dashboard(tmp_path)
    pages = log_pages(client)
    seen = [r["id"] for page in pages for r in page["rows"]]
    assert [len(p["rows"]) for p in pages] == [50, 50, 23] and all(p["total"] == 123 for p in pages)
    assert (pages[1]["first"], pages[1]["last"]) == (51, 100)
    assert len(set(seen)) == 123
    order = [(r["ts"], r["id"]) for p in pages for r in p["rows"]]
    assert order == sorted(order, reverse=True)
    back = get(client, "logs", newer=pages[2]["newer"], **{"from": "50"})
    assert [r["id"] for r in back["rows"]] == [r["id"] for r in pages[1]["rows"]]
    one = client.get(f"/api/logs/{seen[0]}").json()
    assert one["input_tokens"] == 1002 and one["model"] == "gpt-4o"  # the last written of the newest second
    assert client.get("/api/logs/999999").status_code == 404


NUMBERS = ("requests", "errors", "input_tokens", "output_tokens", "cached_tokens")


def same_numbers(shown: dict, want: dict, where: object) -> None:
    for name in NUMBERS:
        assert shown[name] == want[name], (where, name)
    assert shown["cost_usd"] == (pytest.approx(want["cost_usd"], abs=1e-9) if want["cost_usd"] else None), where


def test_every_page_shows_what_metrion_report_says_for_the_same_period(tmp_path: Path) -> None:
    import random
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from dashboard_data import rows as realistic

    write(tmp_path / "m.db", realistic(3000, 5, NOW, random.Random(3)))
    conn = sqlite3.connect(tmp_path / "m.db")
    client = dashboard(tmp_path)
    for since, until in [("2026-11-15T00:00:00.000Z", "2026-11-20T12:30:00.000Z"), ("2026-11-17T03:17:42.250Z",
                         "2026-11-19T22:05:00.000Z"), ("2026-11-18T10:20:00.000Z", "2026-11-18T10:40:00.000Z"),
                         ("2026-11-18T04:10:00.000Z", "2026-11-19T10:00:00.000Z")]:
        params = {"period": "custom", "since": since, "until": until}
        # the query layer, grouped as `metrion report --by model`
        expected = {r["model"]: r for r in report.report(conn, since, until, ["model"])}
        shown = {r["model"]: r for r in grouped(conn, Filters(since, until), ("model",))}
        assert set(shown) == set(expected)
        for model, want in expected.items():
            same_numbers(shown[model], want, (since, model))
        # every page, through its JSON endpoint
        (everything,) = report.report(conn, since, until, [])
        overview = get(client, "overview", **params)
        cards = {name: card["value"] for name, card in overview["cards"].items()}
        same_numbers(cards, everything, (since, "overview"))
        costs = get(client, "costs", **params)
        same_numbers({**costs["total"], "errors": everything["errors"]}, everything, (since, "costs total"))
        for table, by in (("model", "model"), ("provider", "provider"), ("token", "token"), ("requester", "requester")):
            want = {r[by]: r for r in report.report(conn, since, until, [by])}
            got = {r["name"]: r for r in costs["tables"][table]}
            assert set(got) == set(want), (since, table)
            for name, row in want.items():
                same_numbers(got[name], row, (since, table, name))
        errors = get(client, "errors", **params)
        assert (errors["requests"], errors["errors"]) == (everything["requests"], everything["errors"])
        assert get(client, "logs", **params)["total"] == everything["requests"]
        latency = get(client, "latency", **params)
        by_model = {(r["provider"], r["model"]): r for r in latency["by_model"]}
        want = {(r["provider"], r["model"]): r for r in report.report(conn, since, until, ["provider", "model"])}
        assert set(by_model) == set(want)
        if latency["percentiles"] == "exact":  # up to 20,000 rows: nearest rank over raw rows, as the report
            assert (latency["overall"]["p50"], latency["overall"]["p95"]) == (everything["latency_p50_ms"],
                                                                              everything["latency_p95_ms"])
            assert cards["latency_p95_ms"] == everything["latency_p95_ms"]
            for key, row in want.items():
                assert (by_model[key]["p50"], by_model[key]["p95"]) == (row["latency_p50_ms"], row["latency_p95_ms"])


def test_a_model_filter_matches_the_model_asked_for_or_answered_like_metrion_logs(tmp_path: Path) -> None:
    # Successes carry the dated model the provider answered, failures the alias asked for: gpt-4o finds both.
    rows = [row(f"11-20T{hour}:{minute}:00", "gpt-4o-2024-08-06", requested_model="gpt-4o", input_tokens=10,
                total_tokens=10, latency_ms=500.0) for hour in ("09", "10", "12") for minute in ("05", "50")]
    rows += [row("11-20T10:20:00", status=429, requested_model="gpt-4o", error="provider: rate limited"),
             row("11-20T12:20:00", "gpt-4o-mini-2024-07-18", requested_model="gpt-4o-mini", input_tokens=7)]
    write(tmp_path / "m.db", rows)
    client = dashboard(tmp_path)
    conn = sqlite3.connect(tmp_path / "m.db")
    # 09:30 to 12:25: raw rows at both edges, hourly aggregates between them
    since, until = "2026-11-20T09:30:00.000Z", "2026-11-20T12:25:00.000Z"
    for model, requests, errors in (("gpt-4o", 5, 1), ("gpt-4o-2024-08-06", 4, 0), ("gpt-4o-mini", 1, 0)):
        params = {"period": "custom", "since": since, "until": until, "model": model}
        listed = report.logs(conn, 100, report.LogFilter(model=model, since=since, until=until))
        assert len(listed) == requests
        cards = get(client, "overview", **params)["cards"]
        assert (cards["requests"]["value"], cards["errors"]["value"]) == (requests, errors), model
        assert get(client, "logs", **params)["total"] == requests
        assert sum(r["requests"] for r in get(client, "costs", **params)["tables"]["model"]) == requests
    offered = pages.filter_choices(conn, load_config(config_file(tmp_path, tmp_path / "m.db")), Filters(since, until))
    assert offered["model"] == ["gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "gpt-4o-mini-2024-07-18"]


def test_logs_filtered_by_a_model_page_through_the_rows_asked_for_or_answered(tmp_path: Path) -> None:
    rows = []
    for i in range(130):  # successes answered by the dated model, failures with the alias, other models between
        ts = f"11-20T{10 + i // 60:02d}:{i % 60:02d}:00"
        if i % 5 == 0:
            rows.append(row(ts, "gpt-4o-mini-2024-07-18", requested_model="gpt-4o-mini"))
        elif i % 7 == 0:
            rows.append(row(ts, status=500, requested_model="gpt-4o", error="provider: boom"))
        else:
            rows.append(row(ts, "gpt-4o-2024-08-06", requested_model="gpt-4o"))
    rows.append(row("11-20T11:59:00", "gpt-4o", requested_model=None))  # an older row: no requested_model
    write(tmp_path / "m.db", rows)
    client = dashboard(tmp_path)
    conn = sqlite3.connect(tmp_path / "m.db")
    expected = [id_ for (id_,) in conn.execute(
        "SELECT id FROM requests WHERE model = 'gpt-4o' OR requested_model = 'gpt-4o' ORDER BY ts DESC, id DESC")]
    pages = log_pages(client, model="gpt-4o")
    seen = [r["id"] for page in pages for r in page["rows"]]
    assert seen == expected and len(expected) == 105 and pages[0]["total"] == 105
    back = get(client, "logs", model="gpt-4o", newer=pages[2]["newer"], **{"from": "50"})
    assert [r["id"] for r in back["rows"]] == [r["id"] for r in pages[1]["rows"]]
    recent = get(client, "errors", model="gpt-4o")["recent"]
    assert [r["id"] for r in recent] == [id_ for id_ in expected if id_ in {
        i for (i,) in conn.execute("SELECT id FROM requests WHERE status = 500")}]


def test_a_configured_provider_is_a_provider_filter_like_the_five(tmp_path: Path) -> None:
    write(tmp_path / "m.db", [row("11-20T11:00:00", "llama-3.3-70b-versatile", "groq", input_tokens=5), ROWS[0]])
    path = config_file(tmp_path, tmp_path / "m.db")
    config = yaml.safe_load(path.read_text())
    groq = {"url": "http://127.0.0.1:9/v1", "format": "openai"}
    path.write_text(yaml.safe_dump({**config, "providers": {"groq": groq}}))
    client = TestClient(create_app(load_config(path), clock=NOW.timestamp))
    assert get(client, "overview", provider="groq")["cards"]["requests"]["value"] == 1
    assert [r["model"] for r in get(client, "logs", provider="groq")["rows"]] == ["llama-3.3-70b-versatile"]
    assert client.get("/", params={"provider": "groq"}).status_code == 200
    assert client.get("/api/overview", params={"provider": "ollama"}).status_code == 400


def test_the_password_guards_every_page_and_endpoint(tmp_path: Path) -> None:
    write(tmp_path / "m.db", ROWS[:1])
    settings = {"password_hash": hash_password("open sesame", iterations=1000)}
    client = TestClient(create_app(load_config(config_file(tmp_path, tmp_path / "m.db", **settings)),
                                   clock=NOW.timestamp))
    for url in ("/", "/logs", "/api/overview", "/static/dashboard.css"):
        refused = client.get(url)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert client.get(url, auth=("anyone", "wrong")).status_code == 401
        assert client.get(url, auth=("anyone", "open sesame")).status_code == 200
    garbage = {"authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
    assert client.get("/", headers=garbage).status_code == 401


def test_binding_beyond_loopback_needs_a_password(tmp_path: Path) -> None:
    plain = load_config(config_file(tmp_path, tmp_path / "m.db")).dashboard
    guarded = load_config(config_file(tmp_path, tmp_path / "m.db", password="pw")).dashboard
    assert refuse_open_bind("127.0.0.1", plain) is None and refuse_open_bind("::1", plain) is None
    assert "without a password" in refuse_open_bind("0.0.0.0", plain)
    assert refuse_open_bind("0.0.0.0", guarded) is None
    assert password_matches("pw", guarded) and not password_matches("pw ", guarded)


def test_a_missing_database_is_a_503_that_says_what_to_do(tmp_path: Path) -> None:
    client = TestClient(create_app(load_config(config_file(tmp_path, tmp_path / "none.db")), clock=NOW.timestamp))
    response = client.get("/api/overview")
    assert response.status_code == 503 and "start the proxy" in response.json()["error"]
    assert "start the proxy" in client.get("/").text


def test_aggregates_of_an_older_metrion_are_a_503_until_the_proxy_rebuilds_them(tmp_path: Path) -> None:
    write(tmp_path / "m.db", ROWS[:2])
    with sqlite3.connect(tmp_path / "m.db") as conn:  # keyed without requested_model, as before it existed
        conn.execute("DROP TABLE hourly_usage")
        conn.execute("CREATE TABLE hourly_usage (hour TEXT, provider TEXT, model TEXT)")
    client = dashboard(tmp_path)
    response = client.get("/api/overview")
    assert response.status_code == 503 and "start the proxy once (it rebuilds them)" in response.json()["error"]
    assert client.get("/logs").status_code == 503
    store.create_schema(store.connect(tmp_path / "m.db"))  # what the proxy does when it starts
    assert get(client, "overview")["cards"]["requests"]["value"] == 2


def test_logs_read_a_database_from_an_older_metrion_that_lacks_a_column(tmp_path: Path) -> None:
    write(tmp_path / "m.db", ROWS[:2])
    with sqlite3.connect(tmp_path / "m.db") as conn:
        conn.execute("ALTER TABLE requests DROP COLUMN auth_mode")  # the dashboard never alters the database
    client = dashboard(tmp_path)
    rows = get(client, "logs")["rows"]
    assert [r["model"] for r in rows] == ["claude-sonnet-4", "gpt-4o"] and rows[0]["auth_mode"] is None
