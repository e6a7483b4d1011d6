"""Stored and pass-through modes resolve the caller and the key to send; errors never echo a secret."""

from __future__ import annotations

import base64

import pytest
from pydantic import SecretStr

from metrion_addon.auth import Identity, authenticate, identify_forward, lift_query_key, requester
from metrion_addon.config import Token, hash_token
from metrion_addon.errors import MetrionError

STORED = "sk-metrion-" + "1" * 32
PASS = "sk-metrion-" + "2" * 32
TOKENS = {
    hash_token(STORED): Token.model_construct(name="app", token_hash=hash_token(STORED), plan="free",
                                              keys={"openai": SecretStr("sk-oa"), "anthropic": SecretStr("sk-ant")}),
    hash_token(PASS): Token.model_construct(name="own-keys", token_hash=hash_token(PASS), plan="pro", keys={}),
}


@pytest.mark.parametrize(
    ("provider", "headers", "identity", "set_headers", "drop"),
    [
        ("openai", {"authorization": f"Bearer {STORED}"}, Identity("app", "free", "stored"),
         {"authorization": "Bearer sk-oa"}, ()),
        ("anthropic", {"x-api-key": STORED}, Identity("app", "free", "stored"), {"x-api-key": "sk-ant"},
         ("authorization",)),
        ("anthropic", {"authorization": f"Bearer {STORED}"}, Identity("app", "free", "stored"),
         {"x-api-key": "sk-ant"}, ("authorization",)),
        ("openai", {"authorization": "Bearer sk-own", "x-metrion-token": PASS},
         Identity("own-keys", "pro", "pass-through"), None, ()),
        ("anthropic", {"x-api-key": "sk-ant-own", "x-metrion-token": f" {PASS} "},
         Identity("own-keys", "pro", "pass-through"), None, ()),
    ],
)
def test_caller_and_upstream_credential(provider, headers, identity, set_headers, drop) -> None:
    who, upstream = authenticate(provider, headers, TOKENS)
    assert who == identity
    assert upstream.set_headers == set_headers and upstream.drop_headers == drop


@pytest.mark.parametrize(
    ("provider", "headers", "code"),
    [
        ("openai", {"authorization": "Bearer sk-own"}, "missing_metrion_token"),
        ("openai", {}, "missing_metrion_token"),
        ("openai", {"authorization": "Bearer sk-metrion-abc"}, "invalid_metrion_token"),
        ("openai", {"authorization": "Bearer sk-metrion-" + "3" * 32}, "invalid_metrion_token"),
        ("openai", {"authorization": "Bearer sk-own", "x-metrion-token": "sk-metrion-" + "3" * 32},
         "invalid_metrion_token"),
        ("grok", {"authorization": f"Bearer {STORED}"}, "no_stored_key"),
        ("openai", {"authorization": f"Bearer {PASS}"}, "no_stored_key"),
    ],
)
def test_refusals_are_401_and_name_no_secret(provider: str, headers: dict, code: str) -> None:
    with pytest.raises(MetrionError) as caught:
        authenticate(provider, headers, TOKENS)
    assert (caught.value.status, caught.value.code) == (401, code)
    for secret in (*headers.values(), "sk-oa", "sk-ant"):
        assert secret.split()[-1] not in caught.value.message


GEMINI_TOKENS = {
    hash_token(STORED): Token.model_construct(name="app", token_hash=hash_token(STORED), plan="free",
                                              keys={"gemini": SecretStr("AIza-stored")}),
    hash_token(PASS): Token.model_construct(name="own-keys", token_hash=hash_token(PASS), plan="pro", keys={}),
}


@pytest.mark.parametrize(
    ("headers", "identity", "set_headers", "drop"),
    [
        ({"x-goog-api-key": STORED}, Identity("app", "free", "stored"), {"x-goog-api-key": "AIza-stored"},
         ("authorization",)),
        ({"authorization": f"Bearer {STORED}"}, Identity("app", "free", "stored"), {"x-goog-api-key": "AIza-stored"},
         ("authorization",)),
        ({"x-goog-api-key": "AIza-own", "x-metrion-token": PASS}, Identity("own-keys", "pro", "pass-through"), None,
         ()),
    ],
)
def test_gemini_native_key_slot_is_x_goog_api_key(headers, identity, set_headers, drop) -> None:
    who, upstream = authenticate("gemini", headers, GEMINI_TOKENS, "gemini")
    assert who == identity
    assert upstream.set_headers == set_headers and upstream.drop_headers == drop


@pytest.mark.parametrize(
    ("path", "kept", "key"),
    [
        ("/v1beta/models/m:generateContent?key=AIza1", "/v1beta/models/m:generateContent", "AIza1"),
        ("/m:streamGenerateContent?alt=sse&key=sk-metrion-x", "/m:streamGenerateContent?alt=sse", "sk-metrion-x"),
        ("/m?key=a%2Bb&alt=sse", "/m?alt=sse", "a+b"),
        ("/m?x=1&key=k&y=2&key=again", "/m?x=1&y=2", "k"),
        ("/m?monkey=1", "/m?monkey=1", None),
        ("/m", "/m", None),
    ],
)
def test_query_key_is_lifted_out_of_the_path(path: str, kept: str, key: str | None) -> None:
    assert lift_query_key(path) == (kept, key)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_forward_proxy_token_is_the_proxy_password() -> None:
    assert identify_forward(basic("metrion", STORED), TOKENS) == Identity("app", "free", "forward")
    hostile = ("Basic caf\xe9", "Basic \udce9\udcff", "Basic " + base64.b64encode(b"m:\xff").decode())  # fuzz finds
    for value in (None, "", basic("metrion", "wrong"), "Bearer x", "Basic !!!", basic("u", PASS[:-1]), *hostile):
        with pytest.raises(MetrionError) as caught:
            identify_forward(value, TOKENS)
        assert caught.value.status == 407


@pytest.mark.parametrize(("value", "expected"), [("  bot-1 ", "bot-1"), ("", None), ("x" * 300, "x" * 200)])
def test_requester_is_trimmed_and_bounded(value: str, expected: str | None) -> None:
    assert requester({"x-metrion-user": value}) == expected
