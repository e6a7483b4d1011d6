"""Credentials never kept: query parameters redacted in stored paths, and scrubbed from provider error messages."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metrion_addon.redact import REDACTED, redact_query, request_secrets, scrub

KEY = "AIzaSyD-0123456789abcdefghij"


@pytest.mark.parametrize(("path", "expected"), [
    ("/v1/models", "/v1/models"),
    (f"/v1/models?key={KEY}", "/v1/models?key=[redacted]"),
    (f"/x?alt=sse&API_KEY={KEY}&access_token=t0k3n-abcdef", "/x?alt=sse&API_KEY=[redacted]&access_token=[redacted]"),
    (f"/x?keys={KEY}&monkey={KEY}", f"/x?keys={KEY}&monkey={KEY}"),  # only the credential names themselves
    ("/x?key=&token", "/x?key=&token"),
    (f"/x?%6Bey={KEY}", "/x?%6Bey=[redacted]"),  # percent-encoded names too
])
def test_credential_query_parameters_are_redacted(path: str, expected: str) -> None:
    assert redact_query(path) == expected


@given(st.text(), st.sampled_from(["key", "api_key", "access_token", "token"]),
       st.text(min_size=1).filter(lambda value: "&" not in value))
def test_no_credential_value_survives_redaction(prefix: str, name: str, value: str) -> None:
    path = f"/p?{prefix.replace('&', '')}&{name}={value}"
    assert redact_query(path).endswith(f"&{name}={REDACTED}")


def test_request_secrets_cover_headers_basic_passwords_and_query_keys() -> None:
    basic = "Basic " + base64.b64encode(b"me:sk-metrion-" + b"a" * 32).decode()
    secrets = request_secrets({"authorization": "Bearer sk-client-key-123", "x-api-key": "sk-ant-key-456",
                               "proxy-authorization": basic}, f"/x?key={KEY}")
    for secret in ("sk-client-key-123", "sk-ant-key-456", "sk-metrion-" + "a" * 32, KEY):
        assert secret in secrets


def test_provider_error_is_scrubbed_of_every_credential_the_request_carried() -> None:
    message = "Incorrect API key provided: sk-client-key-123. Also sk-metrion-" + "b" * 32
    assert scrub(message, request_secrets({"authorization": "Bearer sk-client-key-123"})) == (
        f"Incorrect API key provided: {REDACTED}. Also {REDACTED}")


def test_short_values_are_not_treated_as_secrets() -> None:
    assert request_secrets({"authorization": "Bearer x"}, "/p?key=1") == ()
