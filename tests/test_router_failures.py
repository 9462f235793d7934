"""How the upstream router classes an upstream that fails after the request was sent: a timeout
waiting for its answer is not "unreachable", not the key's fault, and never tried again on
another key (the upstream may have computed it all; the client has waited the whole time)."""
from __future__ import annotations

import asyncio

from aiohttp import web

from bridge import wire
from bridge.errors import BridgeError, Kind
from bridge.upstreams import ProfileConfig, Router
from tests.test_router_slots import local_upstream


async def _silent_upstream() -> tuple[BaseException | None, int, list[tuple[int, str | None]]]:
    arrived: list[str] = []
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        arrived.append(request.headers["authorization"])
        await release.wait()  # computes for longer than the router waits
        return web.json_response({"id": "c", "choices": []})

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=("k1", "k2"))],
                    timeout=0.5, attempts=3)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", messages=[wire.Message(role="user", content="hi")])
    try:
        try:
            (await router.open(request, "r1")).end()
            error = None
        except BaseException as exc:  # noqa: BLE001 - what the journey gets
            error = exc
        return error, len(arrived), [(k.failures, k.last_error) for k in router.profiles[0].keys]
    finally:
        release.set()
        await router.close()
        await runner.cleanup()


def test_an_upstream_silent_past_the_timeout_is_a_timeout_tried_once():
    error, attempts, keys = asyncio.run(_silent_upstream())
    assert isinstance(error, BridgeError), error
    assert error.kind is Kind.upstream_timeout and error.status == 504
    assert "did not start answering" in error.message and "reached" not in error.message
    assert attempts == 1  # not computed again on the second key
    assert keys == [(0, None), (0, None)]  # a slow answer is no key's fault
