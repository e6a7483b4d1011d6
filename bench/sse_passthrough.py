"""The one thing bare mitmdump needs to be a fair SSE reference: stream `text/event-stream` answers.

Without it mitmdump buffers a whole stream before sending any of it; Metrion makes the same choice per response.
"""

from __future__ import annotations

from mitmproxy import http


class SSEPassthrough:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response and flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True


addons = [SSEPassthrough()]
