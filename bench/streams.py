"""Stream load for the benchmarks: time to first token and relayed chunks, and idle streams.

A small asyncio client on raw sockets (no HTTP library in the way): it writes one HTTP/1.1
request per connection and reads the chunked SSE body as it arrives.
"""
from __future__ import annotations

import asyncio
import json
import time


def request_bytes(host: str, port: int, path: str, key: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"Connection: close\r\n\r\n").encode() + payload


async def one_stream(host: str, port: int, raw: bytes) -> tuple[float, int]:
    """(seconds to the first token, data events) of one streamed completion."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(raw)
    first = None
    events = 0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if first is None and b"delta" in data:  # the first token, reasoning or text
                first = time.perf_counter() - started
            events += data.count(b"data: ")
    finally:
        writer.close()
    return (first if first is not None else float("nan")), events


async def stream_load(host: str, port: int, raw: bytes, concurrency: int, seconds: float) -> dict:
    ttfts: list[float] = []
    events = 0
    deadline = time.perf_counter() + seconds

    async def worker():
        nonlocal events
        while time.perf_counter() < deadline:
            ttft, n = await one_stream(host, port, raw)
            ttfts.append(ttft)
            events += n

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ttfts.sort()
    return {"streams": len(ttfts), "events": events, "wall_s": wall,
            "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2], "ttft_p99_ms": 1000 * ttfts[int(len(ttfts) * 0.99)]}


async def hold_idle(host: str, port: int, raw: bytes, count: int, measure) -> dict:
    """Open `count` streams that stay open and silent; call `measure()` while they are."""
    writers = []
    opened = 0

    async def open_one():
        nonlocal opened
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(raw)
        data = b""
        while b"data: " not in data:  # the stream has begun: the upstream is now silent
            chunk = await reader.read(4096)
            if not chunk:
                raise RuntimeError("stream closed before it began: " + data[:200].decode(errors="replace"))
            data += chunk
        writers.append(writer)
        opened += 1

    for start in range(0, count, 250):
        await asyncio.gather(*(open_one() for _ in range(start, min(count, start + 250))))
    await asyncio.sleep(1.0)
    result = measure()
    for writer in writers:
        writer.close()
    return {"open": opened, **result}
