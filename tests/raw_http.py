"""HTTP/1.1 over a bare socket, for bytes no HTTP client sends (raw bytes in paths and header values, duplicate
credentials, lying encodings). One request per connection; the answer is read to EOF, cut or not.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: list[tuple[str, bytes]]  # names lower-cased, in order
    body: bytes  # de-chunked
    complete: bool  # the body ended as its framing said (False: the connection was cut)

    def header(self, name: str) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


def request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"",
            chunked: bool = False) -> bytes:
    """The bytes of one request; `Connection: close` and the body's framing are added."""
    framing = [(b"transfer-encoding", b"chunked")] if chunked else [(b"content-length", str(len(body)).encode())]
    head = b"".join(name + b": " + value + b"\r\n" for name, value in [*headers, *framing, (b"connection", b"close")])
    if chunked:
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return method + b" " + target + b" HTTP/1.1\r\n" + head + b"\r\n" + body


def send(port: int, data: bytes, timeout: float = 30) -> RawAnswer:
    """Send `data` to 127.0.0.1:`port` and read the whole answer; raises TimeoutError if none comes in time."""
    return read_answer(open_request(port, data, timeout), timeout)


def open_request(port: int, data: bytes, timeout: float = 30) -> socket.socket:
    """Send `data` on a new connection and leave the answer unread (many requests can be in flight this way)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.sendall(data)
    return conn


def read_answer(conn: socket.socket, timeout: float = 30) -> RawAnswer:
    """Read the answer on `conn` to EOF (or a reset), then close it."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    with conn:
        while True:
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise TimeoutError(f"no complete answer within {timeout} s; got {bytes(received[:200])!r}") from None
            if not chunk:
                break
            received += chunk
    return parse(bytes(received))


def parse(data: bytes) -> RawAnswer:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"no complete response head: {data[:200]!r}")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1").strip().lower(), value.strip()))
    framing = dict(headers)
    if framing.get("transfer-encoding", b"").lower() == b"chunked":
        body, complete = _dechunk(rest)
    elif (length := framing.get("content-length")) is not None:
        body, complete = rest[: int(length)], len(rest) >= int(length)
    else:
        body, complete = rest, True
    return RawAnswer(status, headers, body, complete)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            return bytes(body), False
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(body), True
        body += data[:size]
        if len(data) < size + 2:
            return bytes(body), False
        data = data[size + 2 :]
