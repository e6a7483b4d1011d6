"""Incremental decoder for a JSON array sent element by element: Gemini's streamGenerateContent without alt=sse.

Bytes in any split, each complete element out as soon as its closing brace arrives (a depth scanner, as Google's
own REST client does: strings and escapes honoured, whitespace and commas between elements skipped).
"""

from __future__ import annotations

import json
import re

_STRUCTURE = re.compile(rb'["{}\[\]]')
_IN_STRING = re.compile(rb'["\\]')
_BETWEEN = re.compile(rb"[\s,]*")


class JSONArrayDecoder:
    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0  # next unread byte in _buf
        self._start = -1  # where the element being read starts; -1 between elements
        self._depth = 0
        self._in_string = False
        self._opened = False  # the array's `[` has been read
        self.closed = False  # the array's `]` has been read
        self.broken = False  # the body is not a JSON array of values: nothing more is decoded

    def feed(self, chunk: bytes) -> list[object]:
        """Consume `chunk`; return the elements it completed."""
        if self.closed or self.broken:
            return []
        self._buf += chunk
        elements: list[object] = []
        buf = self._buf
        while self._pos < len(buf) and not self.broken and not self.closed:
            if self._start < 0:
                self._pos = _BETWEEN.match(buf, self._pos).end()  # type: ignore[union-attr]
                if self._pos >= len(buf):
                    break
                byte = buf[self._pos : self._pos + 1]
                if not self._opened:
                    self._opened = byte == b"["
                    self.broken = not self._opened
                    self._pos += 1
                elif byte == b"]":
                    self.closed = True
                    self._pos += 1
                elif byte in (b"{", b"["):
                    self._start, self._depth = self._pos, 1
                    self._pos += 1
                else:
                    self.broken = True  # a scalar element: not what this decoder is for
                continue
            if self._in_string:
                match = _IN_STRING.search(buf, self._pos)
                if match is None:
                    self._pos = len(buf)
                    break
                if match.group() == b"\\":
                    if match.end() >= len(buf):
                        self._pos = match.start()  # the escaped byte has not arrived yet
                        break
                    self._pos = match.end() + 1
                    continue
                self._in_string = False
                self._pos = match.end()
                continue
            match = _STRUCTURE.search(buf, self._pos)
            if match is None:
                self._pos = len(buf)
                break
            self._pos = match.end()
            char = match.group()
            if char == b'"':
                self._in_string = True
            elif char in (b"{", b"["):
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    elements.append(self._decode(buf[self._start : self._pos]))
                    self._start = -1
        keep = self._start if self._start >= 0 else self._pos
        self._buf = buf[keep:]
        self._pos -= keep
        if self._start >= 0:
            self._start = 0
        return [element for element in elements if element is not None]

    def _decode(self, raw: bytes) -> object:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self.broken = True
            return None
