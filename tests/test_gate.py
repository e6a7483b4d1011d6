"""What a forwarded request carries to its provider: Metrion's own headers gone, the stored key set, plain text."""

from __future__ import annotations

import pytest

from metrion_addon.auth import Upstream
from metrion_addon.gate import upstream_header_changes

SNAPSHOT = {"host": "h", "x-metrion-token": "t", "x-metrion-user": "u", "authorization": "Bearer sk-metrion-x",
            "content-type": "application/json"}


@pytest.mark.parametrize(("credentials", "drop", "replace"), [
    (None, {"x-metrion-token", "x-metrion-user", "proxy-authorization"}, {"accept-encoding": "identity"}),
    (Upstream({"authorization": "Bearer sk-stored"}, ("x-api-key",)),
     {"x-metrion-token", "x-metrion-user", "proxy-authorization", "x-api-key"},
     {"accept-encoding": "identity", "authorization": "Bearer sk-stored"}),
    (Upstream(None, ("authorization",)),
     {"x-metrion-token", "x-metrion-user", "proxy-authorization", "authorization"}, {"accept-encoding": "identity"}),
])
def test_metrion_headers_and_proxy_credentials_never_reach_the_provider(
        credentials: Upstream | None, drop: set[str], replace: dict[str, str]) -> None:
    assert upstream_header_changes(SNAPSHOT, credentials) == (drop, replace)
