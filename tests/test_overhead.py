"""What the bridge says it spent itself (`x-codeplan-overhead-ms`, the access line's
`overhead_ms`, `codeplan_bridge_overhead_seconds`): everything but waiting for the upstream.

With early forwarding an upstream faster than the admission answers before the request has
heard its admission; that wait is the bridge's (bridge/flight.py `Flight.overhead_ms`), and an
upstream that takes its time is not. A real upstream client (bridge/upstreams.py `Router`) to
an upstream on 127.0.0.1; a ledger whose admissions answer after a delay stands in for the
database."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from bridge.journey import OVERHEAD_HEADER, Journey
from bridge.metrics import NoMetrics
from bridge.ports import Admission, Principal, Reservation, Settlement
from bridge.settings import BridgeSettings
from bridge.surfaces.chat import ChatSurface
from bridge.upstreams import ProfileConfig, Router

from .test_router_slots import local_upstream

PRINCIPAL = Principal(account_id=1, api_key_id=1, subscription_id=1, plan_id="p", models=("glm-4.6",))
COMPLETION = {"id": "c1", "object": "chat.completion", "created": 1, "model": "glm-4.6",
              "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": "hello"}}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


class Recorded(NoMetrics):
    """What the access line gives the histogram (`codeplan_bridge_overhead_seconds`)."""

    def __init__(self) -> None:
        self.overheads_ms: list[float] = []

    def request(self, surface: str, model: str, status: int, overhead_s: float, ttft_s: float | None) -> None:
        self.overheads_ms.append(overhead_s * 1000)


class Keys:
    async def authenticate(self, key: str) -> Principal | None:
        return PRINCIPAL


class SlowLedger:
    """Admits everything with room to spare, `delay` seconds after it is asked."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.admitted_at: list[float] = []

    def admit(self, reservation: Reservation) -> "asyncio.Future[Admission]":
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def answer() -> None:
            self.admitted_at.append(loop.time())
            future.set_result(Admission("admitted", room=10**12))
        loop.call_later(self.delay, answer)
        return future

    def settle(self, settlement: Settlement) -> "asyncio.Future[int | None]":
        written = asyncio.get_running_loop().create_future()
        written.set_result(0)
        return written

    async def heartbeat(self, entry_id, delivered_tokens: int) -> bool:
        return True


async def test_a_wait_for_the_admission_is_the_bridges_and_a_slow_upstream_is_not():
    upstream_delay = [0.0]
    upstream_fails = [False]
    forwarded_at: list[float] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        forwarded_at.append(asyncio.get_running_loop().time())
        await asyncio.sleep(upstream_delay[0])
        if upstream_fails[0]:
            return web.json_response({"error": {"code": "1234", "message": "Network error"}}, status=500)
        if not (await request.json()).get("stream"):
            return web.json_response(COMPLETION)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c1", "created": 1, "model": "glm-4.6",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hello"}}]}
        last = {"id": "c1", "created": 1, "model": "glm-4.6",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": COMPLETION["usage"]}
        await response.write(f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=("k1",))],
                    timeout=60, attempts=1)
    await router.start()
    ledger = SlowLedger()
    metrics = Recorded()
    journey = Journey(settings=BridgeSettings(), auth=Keys(), ledger=ledger, upstream=router, metrics=metrics)

    told_ms: list[float] = []

    async def overhead_ms(stream: bool = False) -> float:
        body = json.dumps({"model": "glm-4.6", "stream": stream,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()

        async def read_body() -> bytes:
            return body
        reply = await journey.handle(ChatSurface(), "key", read_body)
        assert reply.status == (502 if upstream_fails[0] else 200), reply.body
        if stream:
            assert b"hello" in b"".join([part async for part in reply.stream])
        told = float(reply.headers[OVERHEAD_HEADER])
        # settled (the ledger writes at once): the access line and the histogram say the same
        for _ in range(100):
            if len(metrics.overheads_ms) == len(told_ms) + 1:
                break
            await asyncio.sleep(0.01)
        told_ms.append(told)
        assert metrics.overheads_ms == pytest.approx(told_ms, abs=0.01)
        return told

    try:
        await overhead_ms()  # admitted first: the journey learns the subscription's room
        # forwarded early: the upstream answers at once, the admission 300 ms later
        ledger.delay = 0.3
        waited_for_admission = await overhead_ms()
        assert forwarded_at[-1] < ledger.admitted_at[-1] - 0.2  # forwarded early, answered at once
        assert waited_for_admission >= 250, waited_for_admission  # (it read ~0 before)
        # the same for a stream, whose headers go out once the upstream's status is in
        assert await overhead_ms(stream=True) >= 250
        assert forwarded_at[-1] < ledger.admitted_at[-1] - 0.2
        # an error answer too: the router gave up at once, the admission came 300 ms later
        upstream_fails[0] = True
        assert await overhead_ms() >= 250
        assert forwarded_at[-1] < ledger.admitted_at[-1] - 0.2
        upstream_fails[0] = False
        # the admission at once, the upstream 300 ms: none of its time is the bridge's
        ledger.delay, upstream_delay[0] = 0.0, 0.3
        waited_for_upstream = await overhead_ms()
        assert waited_for_upstream < 150, waited_for_upstream
    finally:
        await router.close()
        await runner.cleanup()
