"""Test-only mitmproxy script, loaded after the addon: the writer thread takes each row 20 ms late, as on a loaded
machine where that thread is scheduled late. Finished requests then hold their whole budget reservation a moment
longer than usual.
"""

from __future__ import annotations

import time

from metrion_addon.store import RequestRecord
from metrion_addon.store.writer import Writer

_take = Writer._take


def _late_take(self: Writer, item: object) -> None:
    if isinstance(item, RequestRecord):
        time.sleep(0.02)
    _take(self, item)


Writer._take = _late_take  # type: ignore[method-assign]
