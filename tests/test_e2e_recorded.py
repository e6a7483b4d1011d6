"""Traffic recorded from the real provider APIs by others (tests/recordings/, sources in SOURCES.md), replayed
through a real mitmdump: the mock serves each recorded reply byte for byte, and the test checks what the client
got, what reached the upstream, the row's usage, and its cost against genai-prices on that usage."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path

import anthropic
import genai_prices
import httpx
import openai
import pytest
from google import genai
from google.genai import types as genai_types
from harness import APP_TOKEN, Proxy, base_config

from metrion_addon.mock_provider import MockProvider
from metrion_addon.sse import SSEDecoder

RECORDINGS = Path(__file__).with_name("recordings")
NAMES = sorted(path.stem for path in RECORDINGS.glob("*.json"))
PRICE_IDS = {"anthropic": "anthropic", "openai": "openai", "gemini": "google", "mistral": "mistral",
             "grok": "x-ai", "groq": "groq"}
ROW_FIELDS = ("model", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
              "usage_source")


@pytest.fixture(scope="module")
def recorded_proxy(mock: MockProvider, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("recorded")
    config = base_config(mock.base_url, workdir / "metrion.db")
    config["providers"]["groq"] = {"url": mock.base_url("groq"), "format": "openai"}
    config["tokens"][0]["keys"]["groq"] = "gsk-stored"
    running = Proxy(workdir, config).start()
    yield running
    running.stop()


def chunks_of(body: bytes, content_type: str) -> list[bytes]:
    """The reply as the provider sent it: event by event for streams, whole for JSON."""
    if not content_type.startswith("text/event-stream"):
        return [body]
    return [event.raw for event in SSEDecoder().feed(body)] or [body]


def expected_cost(row: dict, provider: str) -> float | None:
    usage = genai_prices.Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"],
                               cache_read_tokens=row["cache_read_tokens"], cache_write_tokens=row["cache_write_tokens"])
    try:
        price = genai_prices.calc_price(usage, row["model"], provider_id=PRICE_IDS[provider],
                                        genai_request_timestamp=datetime.fromisoformat(row["ts"]))
    except LookupError:
        return None
    return float(price.total_price)


def replay(mock: MockProvider, name: str, prefix: str = "") -> tuple[dict, str]:
    """The recording `name`, and the key under which the mock now answers with it (also the requester to filter on)."""
    recording = json.loads((RECORDINGS / f"{name}.json").read_text(encoding="utf-8"))
    key = f"{prefix}{name}-{uuid.uuid4().hex[:8]}"
    mock.replay(key, recording["status"], {"content-type": recording["content_type"]},
                chunks_of(recording["body"].encode(), recording["content_type"]))
    return recording, key


def metered_as_recorded(proxy: Proxy, key: str, recording: dict) -> dict:
    """The one row of the request sent with requester `key`, checked against the recording's expected row."""
    (row,) = proxy.rows("requester = ?", (key,))
    assert {field: row[field] for field in ROW_FIELDS} == recording["expected_row"]
    assert (row["status"], row["error"], row["provider"]) == (recording["status"], None, recording["provider"])
    return row


@pytest.mark.parametrize("name", NAMES)
def test_recorded_exchange_is_relayed_unchanged_and_metered_exactly(
    recorded_proxy: Proxy, mock: MockProvider, name: str
) -> None:
    recording, key = replay(mock, name)
    body = recording["body"].encode()
    sent = json.dumps(recording["request"]).encode()
    credential = ({"x-api-key": APP_TOKEN, "anthropic-version": "2023-06-01"} if recording["provider"] == "anthropic"
                  else {"x-goog-api-key": APP_TOKEN} if recording["provider"] == "gemini"
                  else {"authorization": f"Bearer {APP_TOKEN}"})
    headers = {**credential, "content-type": "application/json", "x-mock-replay": key, "x-metrion-user": key}
    with httpx.stream("POST", recorded_proxy.url + recording["path"], content=sent, headers=headers,
                      timeout=10) as response:
        received = response.read()

    assert response.status_code == recording["status"]
    assert received == body  # the recorded bytes, untouched (Metrion hid nothing: no usage-only chunk it added)
    (upstream,) = [r for r in mock.received if r.headers.get("x-mock-replay") == key]
    request = recording["request"]
    if upstream.body != sent:  # the one documented change: stream usage asked for on the client's behalf
        assert recording["provider"] in ("openai", "grok", "groq") and request.get("stream") is True
        assert json.loads(upstream.body) == {**request, "stream_options": {"include_usage": True}}
        assert upstream.body.replace(b'"stream_options":{"include_usage":true},', b"", 1) == sent
    row = metered_as_recorded(recorded_proxy, key, recording)
    assert row["total_tokens"] == row["input_tokens"] + row["output_tokens"]
    cost = expected_cost(row, recording["provider"])
    assert row["cost_usd"] == (None if cost is None else pytest.approx(cost, rel=1e-9, abs=1e-12))


SDK_STREAMS = [name for name in NAMES if name.endswith("-stream") and name.split("-")[0] in ("openai", "grok",
                                                                                               "mistral", "groq")]


@pytest.mark.parametrize("name", SDK_STREAMS)
def test_recorded_stream_read_by_the_openai_sdk_that_closes_on_done_is_complete(
    recorded_proxy: Proxy, mock: MockProvider, name: str
) -> None:
    # The body stays open 5 s after the recorded [DONE]; the SDK stops reading at [DONE] and closes.
    recording, key = replay(mock, name, "sdk-")
    request = dict(recording["request"])
    client = openai.OpenAI(base_url=recorded_proxy.url + recording["path"].removesuffix("/chat/completions"),
                           api_key=APP_TOKEN, max_retries=0, timeout=10)
    chunks = list(client.chat.completions.create(
        model=request.pop("model"), messages=request.pop("messages"), stream=request.pop("stream"), extra_body=request,
        extra_headers={"x-mock-replay": key, "x-mock-scenario": "hold-end:5", "x-metrion-user": key}))
    assert chunks and chunks[0].model
    assert metered_as_recorded(recorded_proxy, key, recording)["status"] == 200


def sdk_stream(proxy: Proxy, recording: dict, headers: dict[str, str]) -> int:
    """Read the recorded stream through the provider's own SDK (google-genai or anthropic); the events it gave."""
    request = dict(recording["request"])
    if recording["provider"] == "gemini":
        model = recording["path"].split("/models/", 1)[1].split(":", 1)[0]
        client = genai.Client(api_key=APP_TOKEN, http_options=genai_types.HttpOptions(
            base_url=f"{proxy.url}/api/proxy/gemini", headers=headers, timeout=10_000))
        contents = request.pop("contents")
        return len(list(client.models.generate_content_stream(model=model, contents=contents, config={
            "http_options": {"extra_body": request}})))
    claude = anthropic.Anthropic(base_url=f"{proxy.url}/api/proxy", api_key=APP_TOKEN, max_retries=0, timeout=10)
    del request["stream"]
    with claude.messages.stream(model=request.pop("model"), max_tokens=request.pop("max_tokens"),
                                messages=request.pop("messages"), extra_body=request, extra_headers=headers) as events:
        return len(list(events))


@pytest.mark.parametrize("name", [name for name in NAMES if name.split("-")[0] in ("gemini", "anthropic")
                                  and json.loads((RECORDINGS / f"{name}.json").read_text())["content_type"]
                                  .startswith("text/event-stream")])
def test_recorded_stream_read_by_its_official_sdk_is_metered_as_recorded(
    recorded_proxy: Proxy, mock: MockProvider, name: str
) -> None:
    recording, key = replay(mock, name, "sdk-")
    assert sdk_stream(recorded_proxy, recording, {"x-mock-replay": key, "x-metrion-user": key}) > 1
    row = metered_as_recorded(recorded_proxy, key, recording)
    assert row["status"] == 200
    assert row["path"].rsplit("/", 1)[1] == recording["path"].rsplit("/", 1)[1]  # google-genai may say v1, not v1beta


def test_corpus_covers_every_provider_json_and_streamed() -> None:
    shapes = set()
    for name in NAMES:
        recording = json.loads((RECORDINGS / f"{name}.json").read_text(encoding="utf-8"))
        shapes.add((recording["provider"], recording["content_type"].startswith("text/event-stream")))
        assert recording["source"]["commit"] and recording["source"]["repository"] in (
            RECORDINGS / "SOURCES.md").read_text(encoding="utf-8")
    assert shapes >= {(p, s) for p in ("anthropic", "openai", "gemini", "mistral", "grok") for s in (False, True)}
