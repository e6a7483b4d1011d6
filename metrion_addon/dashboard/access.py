"""Who may see the dashboard: HTTP Basic auth against the configured password or its PBKDF2 hash.

Binding anywhere but loopback without a password is refused before the server starts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from metrion_addon.config import DashboardSettings

ITERATIONS = 600_000  # OWASP's 2023 figure for PBKDF2-HMAC-SHA256
REALM = 'Basic realm="Metrion dashboard", charset="UTF-8"'


def hash_password(password: str, salt: str | None = None, iterations: int = ITERATIONS) -> str:
    """`pbkdf2_sha256$<iterations>$<salt>$<hex>`: what `dashboard: {password_hash: ...}` holds."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), iterations).hex()
    return f"pbkdf2_sha256${iterations}${salt}${digest}"


def password_matches(given: str, settings: DashboardSettings) -> bool:
    if settings.password is not None:
        return hmac.compare_digest(given.encode(), settings.password.get_secret_value().encode())
    if settings.password_hash is not None:
        _, iterations, salt, _ = settings.password_hash.split("$")
        return hmac.compare_digest(hash_password(given, salt, int(iterations)), settings.password_hash)
    return False


def basic_password(header: str | None) -> str | None:
    """The password of an `Authorization: Basic …` header (any user name), None if there is none."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open_bind(host: str, settings: DashboardSettings) -> str | None:
    """Why serving on `host` is refused (a reachable address and no password), or None."""
    if is_loopback(host) or settings.protected:
        return None
    return (f"refusing to serve the dashboard on {host} without a password: set dashboard: {{password: ...}} "
            "or password_hash (metrion dashboard --hash-password) in the config, or bind 127.0.0.1")


class PasswordRequired:
    """ASGI middleware: every request needs the password (HTTP Basic, any user name), else 401."""

    def __init__(self, app: ASGIApp, settings: DashboardSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            given = basic_password(headers.get(b"authorization", b"").decode("latin-1"))
            if given is None or not password_matches(given, self.settings):
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"www-authenticate", REALM.encode()), (b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": b"password required\n"})
                return
        await self.app(scope, receive, send)
