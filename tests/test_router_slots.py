"""The upstream router gives a key's slot back on every exit, including a request cancelled while
the upstream's error answer is still arriving (the client left, or admission refused a request
forwarded early): with a per-key cap, a slot lost there is lost for good."""
from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from bridge import wire
from bridge.upstreams import ProfileConfig, Router


async def local_upstream(handler) -> tuple[web.AppRunner, int]:
    """An upstream on 127.0.0.1 answering chat completions with `handler`: (its runner, its port)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def _slot_after_cancel_during_error_body() -> tuple[int, bool]:
    release = asyncio.Event()
    arrived: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        arrived.append(1)
        response = web.StreamResponse(status=503, headers={"content-type": "application/json",
                                                           "content-length": "100"})
        await response.prepare(request)
        await response.write(b'{"error":')
        await release.wait()  # the rest of the error never comes in time
        return response

    runner, port = await local_upstream(handler)
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=("k1",),
                                   concurrency=1)], timeout=60, attempts=1)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", messages=[wire.Message(role="user", content="hi")], stream=True)
    try:
        opening = asyncio.ensure_future(router.open(request, "r1"))
        await asyncio.sleep(0.5)  # the status is in, the error's body is being read
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        key = router.profiles[0].keys[0]
        in_flight = key.in_flight
        following = asyncio.ensure_future(router.open(request, "r2"))
        for _ in range(50):  # the next request reaches the upstream: it had a slot
            if len(arrived) == 2:
                break
            await asyncio.sleep(0.1)
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        return in_flight, len(arrived) == 2
    finally:
        release.set()
        await router.close()
        await runner.cleanup()


def test_a_request_cancelled_while_an_error_body_arrives_gives_its_slot_back():
    in_flight, next_one_served = asyncio.run(_slot_after_cancel_during_error_body())
    assert in_flight == 0
    assert next_one_served  # with a cap of one, a leaked slot would keep it waiting forever


async def _cookies_sent_upstream() -> list[str | None]:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("cookie"))
        # what load balancers and bot shields put on API answers (AWSALB, __cf_bm, ...)
        response = web.json_response({"id": "c", "choices": [], "usage": {"prompt_tokens": 1,
                                      "completion_tokens": 1, "total_tokens": 2}})
        response.set_cookie("affinity", f"user-{len(seen)}")
        return response

    runner, port = await local_upstream(handler)
    # a host name, not an address: aiohttp's cookie jar keeps no cookie from an IP address
    router = Router([ProfileConfig(name="p", base_url=f"http://localhost:{port}/v1", keys=("k1",))],
                    timeout=60, attempts=1)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", messages=[wire.Message(role="user", content="hi")])
    try:
        for entry in ("r1", "r2", "r3"):  # three users' requests, one after the other
            response = await router.open(request, entry)
            await response.read()
        return seen
    finally:
        await router.close()
        await runner.cleanup()


def test_no_cookie_of_one_request_rides_on_the_next():
    """The upstream session is shared by every user's requests: a cookie the upstream set on one
    answer must not be sent with the next request, whoever's it is."""
    assert asyncio.run(_cookies_sent_upstream()) == [None, None, None]


async def _waiting_when_its_keys_are_disabled(how: str) -> BaseException | None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"id": "c", "choices": [], "usage": {"prompt_tokens": 1,
                                  "completion_tokens": 1, "total_tokens": 2}})

    runner, port = await local_upstream(handler)
    config = ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=("k1",), concurrency=1)
    router = Router([config], timeout=60, attempts=2)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", messages=[wire.Message(role="user", content="hi")])
    try:
        first = asyncio.ensure_future(router.open(request, "r1"))
        await asyncio.sleep(0.2)  # it holds the one slot
        second = asyncio.ensure_future(router.open(request, "r2"))
        await asyncio.sleep(0.2)  # it waits for that slot
        # an operator disables the key, or the whole upstream, meanwhile (the admin API; the
        # store's refresh hands the router the new profiles)
        if how == "key":
            await router.replace([config], {}, {"p": frozenset({router.profiles[0].keys[0].fingerprint})})
        else:
            await router.replace([config], {"p": False}, {})
        release.set()
        (await first).end()
        try:
            (await asyncio.wait_for(second, 10)).end()
        except BaseException as exc:  # noqa: BLE001 - what the journey would get
            return exc
        return None
    finally:
        release.set()
        await router.close()
        await runner.cleanup()


@pytest.mark.parametrize("how", ["key", "profile"])
def test_a_request_waiting_for_a_slot_whose_keys_are_disabled_gets_the_bridges_error(how):
    """Not served by what the operator disabled, and not the router's internal failure, which
    the journey does not catch (the client got a 500 and the flight ended as if the client had
    gone): an upstream error in its protocol."""
    from bridge.errors import BridgeError, Kind
    raised = asyncio.run(_waiting_when_its_keys_are_disabled(how))
    assert isinstance(raised, BridgeError), repr(raised)
    assert raised.kind is Kind.upstream_error and raised.upstream_at is not None


class _DatabaseGone:
    """Per-key slots kept by a database that fails (service/upstream_store.py's in production)."""

    def __init__(self) -> None:
        self.asked = 0

    async def prepare(self, key_ids: list[str], cap: int) -> None:
        pass

    async def acquire(self, key_ids: list[str], cap: int) -> tuple[str, int] | None:
        self.asked += 1
        raise OSError("connection refused")

    def release(self, key_id: str, slot: int) -> None:
        pass


async def _when_the_slots_database_fails() -> tuple[BaseException | None, int, int]:
    served: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        served.append(1)
        return web.json_response({})

    runner, port = await local_upstream(handler)
    leases = _DatabaseGone()
    router = Router([ProfileConfig(name="p", base_url=f"http://127.0.0.1:{port}/v1", keys=("k1",),
                                   concurrency=2)], timeout=60, attempts=2, leases=leases)
    await router.start()
    request = wire.ChatRequest(model="glm-4.6", messages=[wire.Message(role="user", content="hi")])
    try:
        (await asyncio.wait_for(router.open(request, "r1"), 10)).end()
        return None, leases.asked, len(served)
    except BaseException as exc:  # noqa: BLE001 - what the journey would get
        return exc, leases.asked, len(served)
    finally:
        await router.close()
        await runner.cleanup()


def test_a_failed_database_of_slots_is_a_retryable_503_not_a_500():
    """The lease of a capped key's slot is a database call: its failure is tried again once
    (attempts=2) and then answered as our database's unavailability, never let out as an
    exception the journey does not expect (a 500, the flight ended as if the client had gone)."""
    from bridge.errors import BridgeError, Kind
    raised, asked, served = asyncio.run(_when_the_slots_database_fails())
    assert isinstance(raised, BridgeError), repr(raised)
    assert (raised.kind, raised.status, raised.retry_after) == (Kind.unavailable, 503, 2)
    assert asked == 2 and served == 0
