"""Incremental Server-Sent Events decoder: bytes in any split, complete events out, each with its raw bytes.

Follows the SSE framing rules (CRLF/CR/LF line ends, `:` comments, one optional space, multi-line data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    raw: bytes  # exactly the bytes of this event, blank line included, for byte-exact forwarding
    name: str | None  # the `event:` field
    data: str | None  # `data:` lines joined with "\n"; None for a comment-only block


class SSEDecoder:
    def __init__(self) -> None:
        self._buf = b""  # the raw bytes of the event being read
        self._scan = 0  # where in _buf the next unread line starts
        self._name: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume `chunk`; return the events it completed."""
        buf = self._buf + chunk if self._buf else chunk
        events: list[Event] = []
        start = 0
        pos = self._scan
        while match := _LINE_END.search(buf, pos):
            if match.end() == len(buf) and match.group() == b"\r":
                break  # maybe the first half of a CRLF split across chunks
            line = buf[pos : match.start()]
            pos = match.end()
            if line:
                self._field(line)
                continue
            events.append(Event(buf[start:pos], self._name, "\n".join(self._data) if self._data else None))
            start = pos
            self._name, self._data = None, []
        self._buf = buf[start:]
        self._scan = pos - start
        return events

    def close(self) -> list[Event]:
        """End of stream: parse what is left, counting a final event that lacks its blank line.

        Forward `pending` before calling this: the raw bytes of events returned here are not exact.
        """
        if not self._buf:
            return []
        events = [event for event in self.feed(b"\n") if event.data is not None]
        if self._data:
            events.append(Event(self._buf, self._name, "\n".join(self._data)))
        self._buf, self._scan, self._name, self._data = b"", 0, None, []
        return events

    @property
    def pending(self) -> bytes:
        return self._buf

    def _field(self, line: bytes) -> None:
        if line[:1] == b":":
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._name = value.decode("utf-8", "replace")
