"""The README's zero-code recipe with the system's curl: which ways of trusting mitmproxy's CA curl honours.

Each call goes through HTTPS_PROXY to api.openai.com, which Metrion intercepts and sends to the mock.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from harness import PASS_TOKEN, Proxy

CA_VARIABLES = ("CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "https_proxy")


def curl(proxy: Proxy, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if name not in CA_VARIABLES}
    clean["HTTPS_PROXY"] = f"http://metrion:{PASS_TOKEN}@127.0.0.1:{proxy.port}"
    return subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "https://api.openai.com/v1/models",
         "-H", "Authorization: Bearer sk-own-openai-key", *args],
        env={**clean, **env}, capture_output=True, text=True, timeout=20,
    )


@pytest.mark.parametrize(
    ("how", "trusted"),
    [
        (lambda ca: ({"CURL_CA_BUNDLE": str(ca)}, []), True),
        (lambda ca: ({"SSL_CERT_FILE": str(ca)}, []), True),
        (lambda ca: ({}, ["--cacert", str(ca)]), True),
        (lambda ca: ({"CURL_CA_BUNDLE": str(ca), "SSL_CERT_FILE": "/nonexistent.pem"}, []), True),  # first wins
        (lambda ca: ({"SSL_CERT_DIR": str(ca.parent)}, []), False),  # a directory needs OpenSSL's hashed names
        (lambda ca: ({}, []), False),
    ],
    ids=["CURL_CA_BUNDLE", "SSL_CERT_FILE", "--cacert", "CURL_CA_BUNDLE-before-SSL_CERT_FILE", "SSL_CERT_DIR", "none"],
)
def test_which_ways_of_trusting_the_ca_curl_honours(proxy: Proxy, how, trusted: bool) -> None:
    env, args = how(Path(proxy.ca_cert))
    before = len(proxy.rows("path = '/v1/models'", timeout=0))

    result = curl(proxy, env, *args)

    if trusted:
        assert (result.returncode, result.stdout) == (0, "200"), result.stderr
        assert len(proxy.rows("path = '/v1/models'", n=before + 1)) == before + 1
    else:
        assert result.returncode == 60, result.stderr  # curl refuses the certificate: nothing is sent
        assert len(proxy.rows("path = '/v1/models'", timeout=0.3)) == before
