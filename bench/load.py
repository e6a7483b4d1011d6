"""The benchmark's load generator, run as its own process: raw HTTP/1.1 keep-alive over asyncio streams.

Reads one JSON job on argv, prints one JSON result: request latencies (`requests`) or per-event stream timings.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

_T = re.compile(rb'"t":(\d+)')


def request_bytes(job: dict, stream: bool) -> bytes:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    data = json.dumps(body).encode()
    headers = {"host": job["host"], "content-type": "application/json", "content-length": str(len(data)),
               **job.get("headers", {})}
    head = f"POST {job['target']} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + data


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return int(lines[0].split(" ")[1]), headers


async def _read_chunks(reader: asyncio.StreamReader):
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        async for _ in _read_chunks(reader):
            pass


async def _requests(job: dict) -> dict:
    """`conns` keep-alive connections in a closed loop until `count` requests or `duration` seconds.

    Each connection first sends `warmup` untimed requests; the clock starts once every connection is warm.
    """
    raw = request_bytes(job, stream=job.get("stream", False))  # a stream is timed until its last byte
    latencies: list[int] = []
    errors = 0
    remaining = [job["count"]]

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(raw)
        status, headers = await _read_head(reader)
        await _read_body(reader, headers)
        return status

    async def warm() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(job["connect_host"], job["connect_port"])
        for _ in range(job.get("warmup", 0)):
            await exchange(reader, writer)
        return reader, writer

    async def timed(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], deadline: float) -> None:
        nonlocal errors
        reader, writer = connection
        while remaining[0] > 0 and time.monotonic() < deadline:
            try:
                remaining[0] -= 1
                t0 = time.perf_counter_ns()
                if await exchange(reader, writer) != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter_ns() - t0)
            except (ConnectionError, asyncio.IncompleteReadError):
                errors += 1  # a dropped connection counts once, then the client reconnects
                writer.close()
                try:
                    reader, writer = await asyncio.open_connection(job["connect_host"], job["connect_port"])
                except OSError:  # the proxy is gone (bench/crash_loss.py kills it): this connection is done
                    return
        writer.close()

    connections = await asyncio.gather(*(warm() for _ in range(job["conns"])))
    start = time.perf_counter()
    deadline = time.monotonic() + job["duration"]
    await asyncio.gather(*(timed(connection, deadline) for connection in connections))
    elapsed = time.perf_counter() - start
    return {"latencies_us": [x / 1000 for x in latencies], "elapsed": elapsed, "errors": errors}


async def _streams(job: dict) -> dict:
    """`streams` concurrent streams (started evenly over `ramp` s), each repeated `repeat` times on its connection.

    Per event: delay = receive time minus the upstream's send time; per stream: time to first event.
    """
    raw = request_bytes(job, stream=True)
    ttfe: list[float] = []
    delays: list[float] = []
    gaps: list[float] = []
    errors = 0

    async def one(index: int) -> None:
        nonlocal errors
        await asyncio.sleep(job.get("ramp", 0) * index / job["streams"])
        reader, writer = await asyncio.open_connection(job["connect_host"], job["connect_port"])
        try:
            for _ in range(job.get("repeat", 1)):
                t0 = time.monotonic_ns()
                writer.write(raw)
                status, headers = await _read_head(reader)
                if status != 200 or "content-length" in headers:  # an error, or a stream the proxy buffered
                    errors += 1
                    await _read_body(reader, headers)
                    continue
                last = None
                buf = b""
                async for chunk in _read_chunks(reader):
                    now = time.monotonic_ns()
                    buf += chunk
                    *events, buf = buf.split(b"\n\n")
                    for event in events:
                        m = _T.search(event)
                        if m is None or b'"usage"' in event:
                            continue
                        delays.append((now - int(m.group(1))) / 1000)
                        if last is None:
                            ttfe.append((now - t0) / 1000)
                        else:
                            gaps.append((now - last) / 1000)
                        last = now
        except (ConnectionError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(job["streams"])))
    return {"ttfe_us": ttfe, "delays_us": delays, "gaps_us": gaps, "errors": errors,
            "elapsed": time.perf_counter() - start}


def main() -> None:
    job = json.loads(sys.argv[1])
    run = _streams if job["kind"] == "streams" else _requests
    print(json.dumps(asyncio.run(run(job))))


if __name__ == "__main__":
    main()
