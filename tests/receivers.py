"""Where alert notifications land in tests: a local webhook receiver and a real SMTP server (aiosmtpd).

Both run on free loopback ports in background threads and record what they received.
"""

from __future__ import annotations

import email
import json
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller
from harness import free_port


class WebhookReceiver:
    """Records every JSON POST; `mode` is "ok" (204), "fail" (500) or "hang" (never answers in time)."""

    def __init__(self, mode: str = "ok", hang_seconds: float = 10.0) -> None:
        self.mode = mode
        self.received: list[dict] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.attempts += 1
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if receiver.mode == "hang":
                    time.sleep(hang_seconds)
                    return
                if receiver.mode == "fail":
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class MailReceiver:
    """A real SMTP server (aiosmtpd) that keeps each message it is handed."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        receiver = self

        class Handler:
            async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
                receiver.messages.append(email.message_from_bytes(envelope.content))  # type: ignore[attr-defined]
                return "250 OK"

        self.port = free_port()
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def start(self) -> MailReceiver:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll `condition` until it is true or `timeout` passes; the last value."""
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(result)
