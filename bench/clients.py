"""Which async HTTP client to forward with: aiohttp against httpx on the same load.

    python -m bench.clients    (a simulator must not be running on port 8097)
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import urllib.request

BODY = json.dumps({"model": "glm-4.6", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "[[sim tokens=16 reasoning=0]] hi"}]}).encode()
URL = "http://127.0.0.1:8097/api/coding/paas/v4/chat/completions"
HEADERS = {"authorization": "Bearer x", "content-type": "application/json"}
N, CONCURRENCY = 3000, 32


async def with_aiohttp() -> None:
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one():
            async with session.post(URL, data=BODY, headers=HEADERS) as response:
                await response.read()
        await drive(one)


async def with_httpx() -> None:
    import httpx
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits) as client:
        async def one():
            (await client.post(URL, content=BODY, headers=HEADERS)).read()
        await drive(one)


async def drive(one) -> None:
    remaining = N

    async def worker():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def measure(name, coroutine) -> str:
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    asyncio.run(coroutine())
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return f"{name:8} {N / wall:7.0f} requests/s, client CPU {1000 * cpu / N:.3f} ms per request"


def main() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    sim = subprocess.Popen(["taskset", "-c", str(cpus[0]), sys.executable, "-m", "service.cli", "simulate",
                            "--port", "8097"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen("http://127.0.0.1:8097/_sim/stats", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        os.sched_setaffinity(0, {cpus[-1]})
        import uvloop
        uvloop.install()
        for round_ in range(2):  # twice each, interleaved: the machine is noisy
            print(measure("aiohttp", with_aiohttp))
            print(measure("httpx", with_httpx))
    finally:
        sim.terminate()


if __name__ == "__main__":
    main()
