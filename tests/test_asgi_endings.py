"""The ASGI adapter's ends of a request (bridge/asgi.py), in-process with a journey over fakes:
a cancellation of the server's own is never taken for the client's leaving, and a stream whose
client leaves before its first step (while its headers are written) still ends its flight."""
from __future__ import annotations

import asyncio
import json
import time

from bridge import asgi
from bridge.journey import Journey
from bridge.ports import Admission, Principal, Reservation, Settlement
from bridge.settings import BridgeSettings
from bridge.surfaces.chat import ChatSurface

PRINCIPAL = Principal(account_id=1, api_key_id=1, subscription_id=1, plan_id="p", models=("glm-4.6",))


def body(stream: bool) -> bytes:
    return json.dumps({"model": "glm-4.6", "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


class Keys:
    async def authenticate(self, key: str):
        return PRINCIPAL


class Ledger:
    def __init__(self) -> None:
        self.settled: list[Settlement] = []

    def admit(self, reservation: Reservation) -> "asyncio.Future[Admission]":
        f = asyncio.get_running_loop().create_future()
        f.set_result(Admission("admitted", room=0))
        return f

    def settle(self, settlement: Settlement) -> "asyncio.Future[int | None]":
        self.settled.append(settlement)
        f = asyncio.get_running_loop().create_future()
        f.set_result(0)
        return f

    async def heartbeat(self, entry_id, delivered_tokens: int) -> bool:
        return True


class Content:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def readany(self) -> bytes:
        return await self.queue.get()

    def at_eof(self) -> bool:
        return False


class FakeResponse:
    profile = "fake"
    price = None
    body_done = None

    def __init__(self) -> None:
        self.content = Content()
        self.arrived = time.monotonic()
        self.closed = False

    def end(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    async def read(self) -> bytes:
        await asyncio.Event().wait()
        return b""


class Upstream:
    name = "fake"

    def __init__(self) -> None:
        self.responses: list[FakeResponse] = []

    async def open(self, request, request_id, account=None):
        response = FakeResponse()
        self.responses.append(response)
        return response


def journey(**settings) -> tuple[Journey, Ledger, Upstream]:
    ledger, upstream = Ledger(), Upstream()
    return Journey(settings=BridgeSettings(**settings), auth=Keys(), ledger=ledger, upstream=upstream), ledger, upstream


# ---- the ends -----------------------------------------------------------------------------------

class WaitingJourney:
    async def handle(self, surface, key, read_body):
        await read_body()
        await asyncio.Event().wait()  # waits for the upstream


async def test_a_shutdown_cancel_arriving_with_the_client_leaving_is_not_swallowed():
    """serve() un-cancelled its task whenever the client had left: a cancellation of the
    server's own (its graceful shutdown's timeout) in the same loop pass was swallowed."""
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": body(False), "more_body": False})

    async def send(message):
        pass
    task = asyncio.ensure_future(asgi.serve(WaitingJourney(), ChatSurface(), {"method": "POST", "headers": [(b"authorization", b"Bearer k")]},
                                            inbox.get, send, 1 << 20))
    await asyncio.sleep(asgi.LISTEN_AFTER + 0.05)  # the body is read; the listener waits in receive
    inbox.put_nowait({"type": "http.disconnect"})
    await asyncio.sleep(0)  # the listener runs: gone, task.cancel()
    task.cancel()  # and the server cancels the request's task (graceful-shutdown timeout) in the same pass
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled(), "the server's cancellation was swallowed: the task ended normally " \
                             f"with cancelling()={task.cancelling()}"


async def test_a_client_leaving_while_the_headers_are_written_still_ends_the_flight():
    """An ASGI `send` that waits on the headers (a full write buffer, HTTP/2): the client's
    leaving cancelled the task there, and closing the relay's generator before its first step
    ran none of its code: the flight was never ended, never settled, its upstream response and
    key slot kept, its keeper beating until the lifetime cap."""
    j, ledger, upstream = journey()
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": body(True), "more_body": False})

    async def send(message):
        if message["type"] == "http.response.start":
            inbox.put_nowait({"type": "http.disconnect"})  # the client hangs up now
            await asyncio.sleep(0.05)  # the server waits for its write buffer to drain
    await asgi.serve(j, ChatSurface(), {"method": "POST", "headers": [(b"authorization", b"Bearer k")]}, inbox.get, send, 1 << 20)
    await asyncio.sleep(0.1)
    assert upstream.responses, "the upstream was asked"
    assert not j.flights.live, "the flight is still live (heartbeats on, entry pending)"
    assert upstream.responses[0].closed, "the upstream response (and its key's slot) is kept"
    assert len(ledger.settled) == 1, ledger.settled
