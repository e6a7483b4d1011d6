"""A minimal OpenAI-shaped upstream for the benchmark, run as its own process so it shares no GIL with the load.

Raw asyncio HTTP/1.1 with keep-alive. `x-bench-events: N` and `x-bench-interval-ms: MS` shape a stream;
each streamed event carries `"t"`, its send time in `time.monotonic_ns()` (one clock for all local processes).
`GET /bench/count` answers how many chat requests it has received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

USAGE = {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
REPLY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Echo: hi"}, "finish_reason": "stop"}],
    "usage": USAGE,
}, separators=(",", ":")).encode()
JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(REPLY)).encode() + b"\r\n\r\n" + REPLY)
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
RECEIVED = [0]  # chat requests read so far


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(i: int, obj: dict | None = None) -> bytes:
    obj = obj or {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                  "model": "gpt-4o-2024-08-06",
                  "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
    obj["t"] = time.monotonic_ns()
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


async def _stream(writer: asyncio.StreamWriter, events: int, interval: float, include_usage: bool) -> None:
    writer.write(SSE_HEAD)
    start = time.monotonic()
    for i in range(events):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        writer.write(_event(i))
        await writer.drain()
    tail = b""
    if include_usage:
        tail += _event(events, {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                                "model": "gpt-4o-2024-08-06", "choices": [], "usage": USAGE})
    writer.write(tail + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if path == "/bench/count":  # how many chat requests arrived (bench/crash_loss.py compares it with rows)
                count = str(RECEIVED[0]).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(count), count))
                continue
            if not path.endswith("/chat/completions"):
                writer.write(NOT_FOUND)
                continue
            RECEIVED[0] += 1
            request = json.loads(body or b"{}")
            if request.get("stream"):
                events = int(headers.get("x-bench-events", "6"))
                interval = float(headers.get("x-bench-interval-ms", "0")) / 1000
                usage = bool((request.get("stream_options") or {}).get("include_usage"))
                await _stream(writer, events, interval, usage)
            else:
                writer.write(JSON_RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, backlog=2048, reuse_address=True)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(main(parser.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(0)
