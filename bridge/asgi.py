"""The bridge's hot routes as raw ASGI handlers: headers read straight from the scope, the body
read only after the key is known, constant headers pre-encoded, no per-request framework
objects (Litestar still routes; it builds no Request or Response for these paths).

A streamed answer is sent as the journey's iterator yields it; when the client goes away
(`http.disconnect`), the sending task is cancelled at once, wherever it waits, so the request's
Flight learns of it immediately (a long silent think must not keep an abandoned upstream busy).
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable

from .errors import BridgeError, Kind
from .journey import Journey, Reply
from .surfaces import Surface

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = b"application/json"
_ENCODED: dict[str, bytes] = {"application/json": _JSON, "text/event-stream": b"text/event-stream"}


class ClientDisconnected(Exception):
    pass


def api_key(headers: list[tuple[bytes, bytes]]) -> str:
    """The key from `Authorization: Bearer` or `x-api-key` (Claude Code may send both)."""
    fallback = b""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
        elif name == b"x-api-key":
            fallback = value.strip()
    return fallback.decode("latin-1")


def body_reader(receive: Receive, limit: int) -> Callable[[], Awaitable[bytes]]:
    """Reads the request body when asked (after authentication), refusing more than `limit`."""
    async def read() -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BridgeError(Kind.invalid_request, f"The request body is larger than {limit} bytes.",
                                  status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return read


def _headers(reply: Reply, length: int | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", _ENCODED.get(reply.media_type) or reply.media_type.encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    for name, value in reply.headers.items():
        headers.append((name.encode(), value.encode("latin-1")))
    return headers


async def send_reply(reply: Reply, receive: Receive, send: Send) -> None:
    if reply.stream is None:
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": _headers(reply, len(reply.body))})
        await send({"type": "http.response.body", "body": reply.body, "more_body": False})
        return
    stream = reply.stream
    task = asyncio.current_task()
    assert task is not None
    # a flag, not an asyncio.Event: nothing waits on it, and an Event's waiter deque costs
    # ~0.7 KB per open stream
    gone = False

    async def listen() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    listener = asyncio.ensure_future(listen())
    try:
        await send({"type": "http.response.start", "status": reply.status, "headers": _headers(reply, None)})
        async for piece in stream:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()  # the client left: nothing more to do, and this task lives on normally
    finally:
        listener.cancel()
        # the journey's iterator ends here whatever happened: its Flight settles the request
        with contextlib.suppress(Exception):
            await stream.aclose()


async def serve(journey: Journey, surface: Surface, scope: Scope, receive: Receive, send: Send,
                max_body: int) -> None:
    if scope["method"] != "POST":
        status, headers, body = surface.error(BridgeError(
            Kind.invalid_request, f"{scope['method']} is not allowed here; send a POST.", status=405))
        await send_reply(Reply(status=status, headers={**headers, "allow": "POST"}, body=body), receive, send)
        return
    try:
        reply = await journey.handle(surface, api_key(scope["headers"]), body_reader(receive, max_body))
    except ClientDisconnected:
        return
    await send_reply(reply, receive, send)
