"""The router's look at a stream's first event (bridge/upstreams.py `_first_event`), each path:
the key's slot and the connection given back, the bytes handed on to the relay exactly, the wait
bounded by one read timeout (a reviewer's probes, kept)."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from bridge import wire
from bridge.errors import BridgeError
from bridge.upstreams import ProfileConfig, Router

from .test_router_slots import local_upstream


def _chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    body: dict = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "glm-4.6",
                  "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _run(behaviour, *, timeout=0.6, cap=None, cancel_after=None, keys=("k1",)):
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await behaviour(request, response)
        return response

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=keys, concurrency=cap)],
                    timeout=timeout, attempts=3)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", stream=True, messages=[wire.Message(role="user", content="hi")])
    outcome: object
    started = time.monotonic()
    try:
        task = asyncio.ensure_future(router.open(request, "r1"))
        if cancel_after is not None:
            await asyncio.sleep(cancel_after)
            task.cancel()
        try:
            response = await task
        except BridgeError as error:
            outcome = ("error", error.kind.value)
        except asyncio.CancelledError:
            outcome = ("cancelled",)
        else:
            read = []
            while data := await response.content.readany():
                read.append(data)
            response.end()
            outcome = ("read", b"".join(read))
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.2)
        in_flight = sum(k.in_flight for p in router.health() for k in p.keys)
        acquired = len(router._session.connector._acquired)  # type: ignore[union-attr]
        return outcome, elapsed, in_flight, acquired
    finally:
        await router.close()
        await runner.cleanup()


async def _silent(request, response):
    await asyncio.sleep(5)


async def _pings_then_silent(request, response):
    for _ in range(40):
        await response.write(b": ping\n\n")
        await asyncio.sleep(0.1)


async def _half_event_then_abort(request, response):
    await response.write(b'data: {"id":"c","choices":[')
    await asyncio.sleep(0.05)
    request.transport.close()


async def _first_event_then_sleep(request, response):
    await response.write(_chunk("hi"))
    await asyncio.sleep(5)


@pytest.mark.parametrize("behaviour,cancel_after,expect", [
    (_silent, None, ("error", "upstream_timeout")),
    (_pings_then_silent, None, ("error", "upstream_timeout")),
    (_half_event_then_abort, None, ("error", "upstream_error")),
    (_silent, 0.2, ("cancelled",)),
    (_pings_then_silent, 0.35, ("cancelled",)),
], ids=["silent", "pings", "abort", "cancel_silent", "cancel_pings"])
def test_every_failed_look_gives_back_slot_and_connection(behaviour, cancel_after, expect):
    outcome, elapsed, in_flight, acquired = asyncio.run(_run(behaviour, cancel_after=cancel_after, cap=1))
    assert outcome == expect, outcome
    assert in_flight == 0 and acquired == 0, (in_flight, acquired)
    assert elapsed < 2.5, elapsed  # bounded by the read timeout (0.6 s), not the upstream's whims


WHOLE = _chunk("Hello") + _chunk(None, "stop", {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}) \
    + b"data: [DONE]\n\n"


@pytest.mark.parametrize("pieces", [
    [WHOLE],  # the whole answer in one read, then the upstream closes
    [b"\r\n" * 3 + b": c\r\n\r\n" + WHOLE[:7], WHOLE[7:20], WHOLE[20:]],
    [b": " + b"x" * 70000 + b"\n\n", WHOLE],  # a comment longer than the look
    [WHOLE[:1]] + [WHOLE[i:i + 1] for i in range(1, len(WHOLE))],  # byte by byte
], ids=["whole", "crlf_comments_cut", "long_comment", "bytewise"])
def test_bytes_handed_on_exactly(pieces):
    async def behaviour(request, response):
        for p in pieces:
            await response.write(p)
            await asyncio.sleep(0.001)

    outcome, _, in_flight, acquired = asyncio.run(_run(behaviour, timeout=5))
    assert outcome == ("read", b"".join(pieces)), outcome
    assert in_flight == 0 and acquired == 0


async def _late_ping_then_pings(request, response):
    # the first ping just inside the read timeout (0.6 s), then one every 0.1 s: no event ever
    await asyncio.sleep(0.5)
    for _ in range(30):
        await response.write(b": ping\n\n")
        await asyncio.sleep(0.1)


def test_the_whole_look_is_bounded_by_one_read_timeout():
    """One deadline for the look, from its start: a fresh one for the reads after the first held
    an upstream pinging just inside the timeout for nearly twice it."""
    outcome, elapsed, in_flight, acquired = asyncio.run(_run(_late_ping_then_pings, cap=1))
    assert outcome == ("error", "upstream_timeout"), outcome
    assert elapsed < 0.9, elapsed  # 0.6 s and the scheduling; a second timeout would be ~1.1 s
    assert in_flight == 0 and acquired == 0
