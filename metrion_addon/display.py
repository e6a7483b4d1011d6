"""How Metrion's flows show in mitmproxy's own outputs: the metering column on in mitmweb, and refusals marked.

mitmweb shows a flow's comment (Metrion's one-line summary) only in its `comment` column; mitmdump prints no markers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import ctx, http

from metrion_addon.errors import provider_error_message

log = logging.getLogger(__name__)

REJECTED_MARK = ":no_entry:"  # ⛔ in mitmweb's flow list and the console's; see FlowDisplay for mitmdump
METERING_COLUMN = "comment"


def with_metering_column(columns: Sequence[str]) -> list[str]:
    """mitmweb's flow-list columns with the one holding Metrion's summary added at the end (once)."""
    return list(columns) if METERING_COLUMN in columns else [*columns, METERING_COLUMN]


def refusal_line(flow: http.HTTPFlow) -> str:
    """One log line for a flow Metrion answered itself: no query string (it may hold a key), no headers."""
    request, response = flow.request, flow.response
    target = f"{request.host}:{request.port}" if request.method == "CONNECT" else request.path.split("?", 1)[0]
    status = response.status_code if response else "-"
    message = provider_error_message(response.raw_content) if response else None
    return f"⛔ metrion refused {request.method} {target}: {status} {message or ''}".rstrip()


class FlowDisplay:
    """Turns mitmweb's metering column on unless the user chose columns, and logs each flow Metrion refused."""

    def running(self) -> None:
        if "web_columns" in ctx.options and not ctx.options.has_changed("web_columns"):
            ctx.options.update(web_columns=with_metering_column(ctx.options.web_columns))

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._log_refusal(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._log_refusal(flow)

    def _log_refusal(self, flow: http.HTTPFlow) -> None:
        if flow.marked == REJECTED_MARK:
            log.info(refusal_line(flow))
