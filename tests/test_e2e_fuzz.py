"""Issue 9's fault and fuzz suite: hypothesis-made hostile requests and hostile provider replies through one real
mitmdump, each checked against the same property.

For every case: the client gets the provider's answer or a provider-shaped Metrion error (or, for bytes that are
not HTTP, mitmproxy's own 400 before Metrion sees anything); nothing reaches the upstream without a valid Metrion
token, and no x-metrion-* header, Proxy-Authorization or Metrion token ever does; the writer stays healthy; every
request Metrion handled leaves exactly one row, and the monthly counts equal what reached the upstream.
Derandomized (the same examples on every run) and bounded: 140 examples in all, 5 of them what earlier runs found.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import raw_http
from harness import APP_TOKEN, CLIENT_KEY, PASS_TOKEN, Proxy, base_config, token
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from metrion_addon.mock_provider import MockProvider, Received

FORWARD = token(41)
UNKNOWN = token(0xDEAD)
SETTINGS = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# provider -> (base-URL path, forward-proxy URL, model, the header its SDK puts the key in)
ROUTES = {
    "openai": (b"/api/proxy/openai/v1/chat/completions", b"http://api.openai.com/v1/chat/completions",
               "gpt-4o", b"authorization"),
    "anthropic": (b"/api/proxy/v1/messages", b"http://api.anthropic.com/v1/messages",
                  "claude-sonnet-4-20250514", b"x-api-key"),
    "gemini": (b"/api/proxy/gemini/v1/chat/completions",
               b"http://generativelanguage.googleapis.com/v1beta/openai/chat/completions",
               "gemini-2.5-flash", b"authorization"),
    "mistral": (b"/api/proxy/mistral/v1/chat/completions", b"http://api.mistral.ai/v1/chat/completions",
                "mistral-small-latest", b"authorization"),
}
UPSTREAM_FAILED = {b"upstream_unreachable", b"upstream_timeout"}
METRION_ERRORS = {400, 401, 403, 404, 407, 413, 429, 500, 502, 503, 504}


@dataclass
class Tally:
    """What the module sent and saw, for the totals checked at the end."""

    handled: int = 0  # requests Metrion saw (each must leave a row)
    forwarded: int = 0  # requests that reached the upstream (each must be counted once in monthly_usage)
    unparsed: int = 0  # bytes mitmproxy refused as HTTP before any hook ran
    statuses: dict[int, int] = field(default_factory=dict)


TALLY = Tally()
# The least each test's cases must do: reach Metrion (handled) and reach the upstream (forwarded).
VOLUME = {"test_hostile_requests_are_answered_admitted_or_refused_and_leave_their_row": (50, 15),
          "test_hostile_replies_reach_the_client_as_sent_and_leave_their_row": (40, 40)}
# Checked after each test rather than by a last one, which pytest-xdist may run on another worker (another proxy, an
# empty tally). A fixture, not a wrapper in the tests: hypothesis derives its derandomized examples from their source.
pytestmark = pytest.mark.usefixtures("every_row_kept")


@pytest.fixture(scope="module")
def fuzz_proxy(mock: MockProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("fuzz")
    config = base_config(mock.base_url, workdir / "metrion.db", timeout=5, rate_limit=100000)
    config["tokens"].append({"name": "forward", "token": FORWARD, "plan": "pro"})
    running = Proxy(workdir, config).start()
    yield running
    running.stop()


# strategies


PLACEHOLDER = "C" * 32  # where the case's id goes: drawn ids would repeat across examples, uuid4 in check() does not
MARK = b"case=" + PLACEHOLDER.encode()  # in the query string: it survives into the row's `path` and the upstream


HOSTILE_BYTES = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
SURROGATE_UTF8 = b"\xed\xa0\x80"  # what a lone U+D800 becomes when encoded carelessly (CESU-8 / WTF-8)
HEADER_VALUES = st.one_of(
    HOSTILE_BYTES,
    st.sampled_from([b"caf\xe9", SURROGATE_UTF8, b"\xff\xfe", b"\x00", b"\t x \t", b"a" * 5000, b""]),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),  # lone surrogates as bytes, too
)
PATH_BYTES = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if c > 0x20 and c not in b"?#\x7f"))


@st.composite
def json_strings(draw: st.DrawFn) -> str:
    """A JSON string literal's contents: plain text, lone surrogate escapes, or odd escapes."""
    return draw(st.one_of(
        st.text(max_size=30).map(lambda t: json.dumps(t)[1:-1]),
        st.sampled_from(["\\ud800", "\\udcff", "x\\ud83d", "\\u0000", "\\ud83d\\ude00", "\\\\u12"]),
    ))


@st.composite
def bodies(draw: st.DrawFn, provider: str, stream: bool) -> tuple[bytes, list[tuple[bytes, bytes]], str]:
    """(body, extra headers, what it is): valid, odd, deeply nested, huge, empty, random or lying bytes."""
    model = ROUTES[provider][2]
    kind = draw(st.sampled_from(["valid", "surrogates", "deep", "huge", "empty", "random", "encoding", "types"]))
    content = draw(json_strings()) if kind == "surrogates" else "fuzz"
    name = draw(json_strings()) if kind == "surrogates" and draw(st.booleans()) else model
    flag = "true" if stream else "false"
    text = (f'{{"model": "{name}", "max_tokens": 16, "stream": {flag}, '
            f'"messages": [{{"role": "user", "content": "{content}"}}]}}')
    headers = [(b"content-type", b"application/json")]
    if kind == "deep":
        depth = draw(st.sampled_from([100, 1000, 3000, 20000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        nest = opener * depth + b"1" + closer * depth
        where = draw(st.sampled_from(["field", "content", "top"]))
        if where == "top":
            return nest, headers, f"deep top {depth}"
        body = text.encode()
        if where == "content":
            return body.replace(b'"content": "fuzz"', b'"content": ' + nest), headers, f"deep content {depth}"
        return body[:-1] + b', "x": ' + nest + b"}", headers, f"deep field {depth}"
    if kind == "huge":
        size = draw(st.sampled_from([1, 4])) * 1024 * 1024
        return text.replace('"fuzz"', '"' + "y" * size + '"').encode(), headers, f"huge {size}"
    if kind == "empty":
        return b"", draw(st.sampled_from([headers, []])), "empty"
    if kind == "random":
        return draw(st.binary(max_size=300)), draw(st.sampled_from([headers, []])), "random"
    if kind == "encoding":
        how = draw(st.sampled_from(["utf-16", "latin-1", "bom", "gzip-lie", "gzip", "charset-lie"]))
        if how == "utf-16":
            return text.encode("utf-16"), headers, how
        if how == "latin-1":
            return text.replace("fuzz", "caf\xe9").encode("latin-1"), headers, how
        if how == "bom":
            return b"\xef\xbb\xbf" + text.encode(), headers, how
        if how == "gzip-lie":
            return text.encode(), [*headers, (b"content-encoding", b"gzip")], how
        if how == "gzip":
            return gzip.compress(text.encode()), [*headers, (b"content-encoding", b"gzip")], how
        return text.encode(), [(b"content-type", b"application/json; charset=utf-32")], how
    if kind == "types":
        odd = draw(st.sampled_from(['"model": 1', '"model": null', '"model": ["x"]', '"stream": "yes"',
                                    '"messages": "hi"', '"max_tokens": 1e400', '"max_tokens": -1']))
        return ("{" + odd + ", " + text[1:]).encode(), headers, f"types {odd}"
    return text.encode(), headers, kind


@dataclass(frozen=True)
class Case:
    id: str
    provider: str
    forward: bool
    data: bytes
    valid_token: bool  # some credential in it names a known Metrion token
    scenario: str
    stream: bool
    what: str


def _basic(secret: str) -> bytes:
    return b"Basic " + base64.b64encode(f"m:{secret}".encode())


@st.composite
def credentials(draw: st.DrawFn, provider: str, forward: bool) -> tuple[list[tuple[bytes, bytes]], bool, str]:
    """Credential headers: none, right, wrong, garbage, duplicated or conflicting; and whether any is valid."""
    slot = ROUTES[provider][3]
    bearer = (lambda v: b"Bearer " + v) if slot == b"authorization" else (lambda v: v)
    if forward:
        kind = draw(st.sampled_from(["valid", "none", "wrong", "garbage", "twice", "conflict", "metrion-key"]))
        key = [(slot, bearer(CLIENT_KEY.encode()))]
        if kind == "metrion-key":  # the Metrion token where the provider key goes: never forwarded
            key = [(slot, bearer(draw(st.sampled_from([APP_TOKEN, FORWARD])).encode()))]
        if kind in ("valid", "metrion-key"):
            proxy = [(b"proxy-authorization", _basic(FORWARD))]
        elif kind == "wrong":
            proxy = [(b"proxy-authorization", _basic(UNKNOWN))]
        elif kind == "garbage":
            proxy = [(b"proxy-authorization", b"Basic " + draw(HEADER_VALUES))]
        elif kind == "twice":
            proxy = [(b"proxy-authorization", _basic(FORWARD))] * 2
        elif kind == "conflict":
            proxy = draw(st.permutations([(b"proxy-authorization", _basic(FORWARD)),
                                          (b"proxy-authorization", _basic(UNKNOWN))]))
        else:
            proxy = []
        return [*key, *proxy], kind in ("valid", "twice", "conflict", "metrion-key"), f"forward {kind}"
    kind = draw(st.sampled_from(["stored", "pass", "none", "wrong", "garbage", "dup-slot", "slot-and-other",
                                 "dup-token", "token-in-other-slot"]))
    stored = [(slot, bearer(APP_TOKEN.encode()))]
    passing = [(slot, bearer(CLIENT_KEY.encode())), (b"x-metrion-token", PASS_TOKEN.encode())]
    other = b"x-api-key" if slot == b"authorization" else b"authorization"
    if kind == "stored":
        chosen = stored
    elif kind == "pass":
        chosen = passing
    elif kind == "wrong":
        chosen = [(slot, bearer(UNKNOWN.encode()))]
    elif kind == "garbage":
        chosen = [(slot, draw(HEADER_VALUES)), (b"x-metrion-token", draw(HEADER_VALUES))]
    elif kind == "dup-slot":  # the slot twice: a Metrion token and something else, in either order
        second = draw(st.sampled_from([UNKNOWN, CLIENT_KEY, PASS_TOKEN])).encode()
        chosen = draw(st.permutations([*stored, (slot, bearer(second))])) + draw(st.sampled_from([[], passing[1:]]))
    elif kind == "slot-and-other":  # a valid request plus a credential in the other provider's slot
        extra = draw(st.sampled_from([APP_TOKEN, CLIENT_KEY, UNKNOWN])).encode()
        chosen = draw(st.permutations([*draw(st.sampled_from([stored, passing])), (other, extra)]))
    elif kind == "dup-token":
        chosen = [passing[0], *draw(st.permutations([(b"x-metrion-token", PASS_TOKEN.encode()),
                                                     (b"x-metrion-token", UNKNOWN.encode())]))]
    elif kind == "token-in-other-slot":
        chosen = [(other, APP_TOKEN.encode())]
    else:
        chosen = []
    return list(chosen), kind not in ("none", "wrong", "garbage"), kind


def request_case(provider: str, forward: bool, credentials: list[tuple[bytes, bytes]], valid: bool, what: str,
                 body: bytes, body_headers: list[tuple[bytes, bytes]], suffix: bytes = b"", query: bytes = b"",
                 noise: list[tuple[bytes, bytes]] | None = None, stream: bool = False, chunked: bool = False) -> Case:
    path, url, _, _ = ROUTES[provider]
    target = (url if forward else path) + suffix + b"?" + query + MARK
    host = target.split(b"/")[2] if forward else b"metrion.local"
    headers = [(b"host", host), *credentials, *(noise or []), *body_headers, (b"x-case", PLACEHOLDER.encode())]
    return Case(PLACEHOLDER, provider, forward, raw_http.request(b"POST", target, headers, body, chunked=chunked),
                valid, "", stream, f"{provider} {'forward' if forward else 'base-url'} {what} suffix={suffix!r} "
                f"noise={noise!r}"[:600])


@st.composite
def hostile_requests(draw: st.DrawFn) -> Case:
    provider = draw(st.sampled_from(sorted(ROUTES)))
    forward = draw(st.booleans())
    stream = draw(st.booleans())
    suffix = draw(st.one_of(st.just(b""), PATH_BYTES, st.just(SURROGATE_UTF8), st.just(b"%ed%a0%80%ff")))
    query = draw(st.one_of(st.just(b""), PATH_BYTES.map(lambda b: b"x=" + b + b"&")))
    creds, valid, auth_kind = draw(credentials(provider, forward))
    noise_names = st.sampled_from([b"x-metrion-user", b"x-metrion-cache", b"x-noise", b"user-agent",
                                   b"anthropic-version", b"accept", b"x-metrion-token"])
    noise = draw(st.lists(st.tuples(noise_names, HEADER_VALUES), max_size=3))
    body, body_headers, body_kind = draw(bodies(provider, stream))
    return request_case(provider, forward, creds, valid, f"auth={auth_kind} body={body_kind}", body, body_headers,
                        suffix, query, noise, stream, chunked=draw(st.booleans()))


CHAT_BODY = (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}',
             [(b"content-type", b"application/json")])
# What earlier runs of this suite found (each also has its own test): run first, every time.
FOUND = [
    request_case("openai", True, [(b"proxy-authorization", b"Basic caf\xe9")], False, "non-ASCII proxy password",
                 *CHAT_BODY),
    request_case("openai", False, [(b"authorization", b"Bearer " + APP_TOKEN.encode()),
                                   (b"authorization", b"Bearer " + CLIENT_KEY.encode()),
                                   (b"x-metrion-token", PASS_TOKEN.encode())], True, "token, then own key", *CHAT_BODY),
    request_case("openai", False, [(b"authorization", b"Bearer " + APP_TOKEN.encode()),
                                   (b"x-api-key", PASS_TOKEN.encode())], True, "token in the other slot", *CHAT_BODY),
    request_case("openai", False, [(b"authorization", b"Bearer " + APP_TOKEN.encode())], True, "token in the URL",
                 *CHAT_BODY, query=b"api_key=" + PASS_TOKEN.encode() + b"&"),
    request_case("openai", True, [(b"authorization", b"Bearer " + APP_TOKEN.encode()),
                                  (b"proxy-authorization", _basic(FORWARD))], True, "token as forwarded key",
                 *CHAT_BODY),
]


REPLY_SCENARIOS = st.one_of(
    st.sampled_from(["deep-reply:3000", "deep-reply:50000", "invalid-utf8", "surrogate-model", "surrogate-text",
                     "huge-usage", "no-usage", "error-500", "error-429", "echo-key", "reset", "slow-headers:0.3",
                     "gzip"]),
    st.integers(0, 10**6).map(lambda seed: f"sse-garbage:{seed}"),
    st.integers(1, 8).map(lambda n: f"cut-after:{n}"),
    st.integers(1, 4).map(lambda ms: f"trickle:{ms}"),
)


@st.composite
def hostile_replies(draw: st.DrawFn) -> Case:
    provider = draw(st.sampled_from(sorted(ROUTES)))
    stream = draw(st.booleans())
    scenario = ",".join(draw(st.lists(REPLY_SCENARIOS, min_size=1, max_size=2, unique=True)))
    path, _, model, slot = ROUTES[provider]
    auth = draw(st.sampled_from(["stored", "pass"]))
    key = (APP_TOKEN if auth == "stored" else CLIENT_KEY).encode()
    headers = [(b"host", b"metrion.local"), (slot, b"Bearer " + key if slot == b"authorization" else key)]
    if auth == "pass":
        headers.append((b"x-metrion-token", PASS_TOKEN.encode()))
    body = json.dumps({"model": model, "max_tokens": 16, "stream": stream,
                       "messages": [{"role": "user", "content": f"reply {PLACEHOLDER}"}]}).encode()
    headers += [(b"content-type", b"application/json"), (b"x-mock-scenario", scenario.encode()),
                (b"x-case", PLACEHOLDER.encode())]
    data = raw_http.request(b"POST", path + b"?" + MARK, headers, body)
    return Case(PLACEHOLDER, provider, False, data, True, scenario, stream, f"{provider} {auth} {scenario}")


# the property


def received_for(mock: MockProvider, case: Case) -> list[Received]:
    return [r for r in mock.received if r.headers.get("x-case") == case.id or case.id in r.query]


def rows_for(proxy: Proxy, case: Case, expect: int) -> list[dict]:
    return proxy.rows("path LIKE ?", (f"%case={case.id}%",), n=expect, timeout=5 if expect else 0)


def events(body: bytes) -> list[bytes]:
    return [event for event in body.replace(b"\r\n", b"\n").split(b"\n\n") if event.strip()]


def is_subsequence(part: list[bytes], whole: list[bytes]) -> bool:
    remaining = iter(whole)
    return all(any(event == candidate for candidate in remaining) for event in part)


def assert_provider_shaped(case: Case, answer: raw_http.RawAnswer) -> None:
    """A Metrion error: the status a Metrion refusal has, and the body the provider's SDK parses. Never an internal
    error: the guard would contain it, but hostile input must be refused by name, not by accident."""
    assert answer.status in METRION_ERRORS and answer.header("x-metrion-error") != b"metrion_internal_error", answer
    error = json.loads(answer.body)
    if case.provider == "anthropic":
        assert error["type"] == "error" and {"type", "message"} <= set(error["error"]), error
    else:
        assert {"message", "type", "code"} <= set(error["error"]), error


@pytest.fixture
def every_row_kept(fuzz_proxy: Proxy, request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test: its cases did their share, and the proxy's database holds one row for each case Metrion
    handled on it so far (on this pytest worker: the proxy is the module's) and counted each forwarded one once."""
    before = dataclasses.replace(TALLY, statuses={})
    yield
    handled, forwarded = VOLUME[request.node.originalname]
    assert TALLY.handled - before.handled >= handled and TALLY.forwarded - before.forwarded >= forwarded, TALLY
    with sqlite3.connect(fuzz_proxy.db_path) as conn:
        rows = conn.execute("SELECT count(*) FROM requests WHERE path LIKE '%case=%'").fetchone()[0]
        counted = conn.execute("SELECT coalesce(sum(requests), 0) FROM monthly_usage").fetchone()[0]
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    assert (rows, dead) == (TALLY.handled, 0)
    assert counted == TALLY.forwarded
    assert httpx.get(f"{fuzz_proxy.url}/metrion/health", timeout=10).status_code == 200


def check(proxy: Proxy, mock: MockProvider, drawn: Case) -> None:
    case_id = uuid.uuid4().hex
    case = dataclasses.replace(drawn, id=case_id, data=drawn.data.replace(PLACEHOLDER.encode(), case_id.encode()))
    answer = raw_http.send(proxy.port, case.data, timeout=30)
    TALLY.statuses[answer.status] = TALLY.statuses.get(answer.status, 0) + 1
    got = received_for(mock, case)
    assert len(got) <= 1, "forwarded more than once"
    if got:
        (received,) = got
        assert case.valid_token, f"forwarded without a valid Metrion token: {received.headers}"
        leaked = [name for name in received.headers if name.startswith("x-metrion-") or name == "proxy-authorization"]
        leaked += [value for value in (*received.headers.values(), received.query, received.path)
                   if "sk-metrion-" in value]
        assert not leaked, f"reached the upstream: {leaked}"
        TALLY.forwarded += 1
        mock_id = answer.header("x-mock-id")
        if mock_id is not None:  # the provider's answer, unchanged (a stream may miss the usage chunk Metrion added)
            assert mock_id.decode() == received.id
            sent = mock.sent[received.id]
            if answer.header("content-type") == b"text/event-stream" or case.stream:
                assert is_subsequence(events(answer.body), events(sent)), (answer.body[:300], sent[:300])
            else:
                assert answer.body == sent[: len(answer.body)] and (answer.body == sent or not answer.complete)
        else:  # the upstream failed (reset): Metrion says so in the provider's shape
            assert answer.header("x-metrion-error") is not None, answer
            assert_provider_shaped(case, answer)
    elif b"aiohttp" in (answer.header("server") or b"") or answer.header("x-metrion-error") in UPSTREAM_FAILED:
        # Sent upstream, but the upstream's HTTP parser refused it before the mock saw it (raw bytes in the path, a
        # duplicate User-Agent), answering 400 or closing the connection (Metrion's 502): so it must have been
        # admitted, and it was counted. (Its headers are not recorded; the same headers are checked in other cases.)
        assert case.valid_token, answer
        TALLY.forwarded += 1
    elif answer.header("x-metrion-error") is None:  # mitmproxy refused the bytes as HTTP before any hook ran
        assert answer.status == 400 and b"Bad Request" in answer.body, answer
        TALLY.unparsed += 1  # no row: the total at the end says so
        return
    else:
        assert_provider_shaped(case, answer)
    TALLY.handled += 1
    rows = rows_for(proxy, case, 1)
    assert len(rows) == 1, f"rows: {rows}"
    assert rows[0]["status"] == answer.status or not answer.complete, (rows[0], answer)
    health = httpx.get(f"{proxy.url}/metrion/health", timeout=10)
    assert health.status_code == 200, health.text


@settings(SETTINGS, max_examples=90)
@given(case=hostile_requests())
@example(case=FOUND[0])
@example(case=FOUND[1])
@example(case=FOUND[2])
@example(case=FOUND[3])
@example(case=FOUND[4])
def test_hostile_requests_are_answered_admitted_or_refused_and_leave_their_row(
        fuzz_proxy: Proxy, mock: MockProvider, case: Case) -> None:
    check(fuzz_proxy, mock, case)


@settings(SETTINGS, max_examples=45)
@given(case=hostile_replies())
def test_hostile_replies_reach_the_client_as_sent_and_leave_their_row(
        fuzz_proxy: Proxy, mock: MockProvider, case: Case) -> None:
    check(fuzz_proxy, mock, case)
