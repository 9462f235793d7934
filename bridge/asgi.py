"""The bridge's hot routes as raw ASGI handlers: headers read straight from the scope, the body
read only after the key is known, constant headers pre-encoded, no per-request framework
objects (Litestar still routes; it builds no Request or Response for these paths).

A streamed answer is sent as the journey's iterator yields it. From the moment the request's body
is in (a tenth of a second after, for a whole answer) until its answer is sent, a `Listener`
waits for the client to go away (`http.disconnect`)
and then cancels the request's task at once, wherever it waits: in its admission, for the
upstream's whole answer, or in a stream. The journey's exit hands the request to its Flight
(`Flight.client_gone`), which cancels the upstream request or closes its response, so a client
that gave up never keeps an upstream busy, its key's slot or its plan's concurrency held, nor is
billed an answer it never got (but one that leaves in the tenth of a second before a whole answer's
listener starts, when that answer is done within it: it is settled as answered). The listener is one task per stream, and per whole answer that
takes longer than `LISTEN_AFTER` (until then a timer): created, run until it waits in `receive`,
cancelled at the end.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable, Sequence

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


def api_key(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The key from `Authorization: Bearer` or `x-api-key` (Claude Code may send both; the
    Bearer wins): the first Bearer, else the first `x-api-key`. The one rule of every path, hot
    or not, and of the throttle in front of them (bridge/app.py reads a framework's request
    through it), so a request with two credentials is judged alike wherever it goes, never let
    in on one path and refused on another."""
    fallback = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
        elif name == b"x-api-key" and fallback is None:
            fallback = value
    return (fallback or b"").strip().decode("latin-1")


def unencoded(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Refuses (415) a body sent with a Content-Encoding other than `identity`: the body is JSON
    as sent or nothing, and a compressed one would otherwise be refused as "not valid JSON",
    sending its caller after JSON that is fine. Not decompressed: no coding tool sends a
    compressed body to a provider of its own (Codex compresses with zstd only for OpenAI's own
    provider with a ChatGPT sign-in), and a decoder is one more way for a small body to cost
    the server its whole body limit."""
    for name, value in headers:
        if name == b"content-encoding":
            codings = [c.strip() for c in value.decode("latin-1").lower().split(",")]
            codings = [c for c in codings if c and c != "identity"]
            if codings:
                raise BridgeError(
                    Kind.invalid_request, f"The request body is encoded ({', '.join(codings)}, by its "
                    "Content-Encoding header); send it unencoded: Codeplan reads request bodies as "
                    "plain JSON only.", code="unsupported_content_encoding", status=415)


# how long a request whose body is in may wait before a listener watches for its client leaving
# (`Listener.listen_soon`): most answers come sooner, and a timer is a tenth of a task's cost
LISTEN_AFTER = 0.1


class Listener:
    """Waits, once started (`listen`), for the client to go away; then marks it `gone` and
    cancels the request's task. Started only when the body is in: before, `receive` is the body
    reader's, and two readers of one channel would each miss what the other took. A whole
    answer's request starts it `LISTEN_AFTER` seconds later (`listen_soon`): a task per request
    cost ~5% of the bridge's CPU per request at c=32 (bench/PROFILE.md), and a client that left
    meanwhile is seen at once then (its disconnect waits in `receive`). `gone` is a flag, not an
    asyncio.Event: nothing waits on it, and an Event's waiter deque costs ~0.7 KB per open stream."""

    __slots__ = ("receive", "task", "gone", "_listening", "_soon")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.task = asyncio.current_task()
        self.gone = False
        self._listening: asyncio.Future | None = None
        self._soon: asyncio.TimerHandle | None = None

    def listen_soon(self) -> None:
        if self._listening is None and self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(LISTEN_AFTER, self.listen)

    def listen(self) -> None:
        if self._soon is not None:  # called now (a stream's start), or by the timer itself
            self._soon.cancel()
            self._soon = None
        if self._listening is None:
            self._listening = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        assert self.task is not None
        self.task.cancel()

    def stop(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        if self._listening is not None:
            self._listening.cancel()
            self._listening = None


def body_reader(receive: Receive, limit: int, then: Callable[[], None] | None = None,
                headers: Sequence[tuple[bytes, bytes]] = ()) -> Callable[[], Awaitable[bytes]]:
    """Reads the request body when asked (after authentication), refusing more than `limit`,
    and one with a Content-Encoding (415, `unencoded`: `headers` are the request's) before a
    byte of it; calls `then` once the whole body is in."""
    async def read() -> bytes:
        unencoded(headers)
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
                if then is not None:
                    then()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return read


def _headers(reply: Reply, length: int | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", _ENCODED.get(reply.media_type) or reply.media_type.encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    for name, value in reply.headers.items():
        headers.append((name.encode(), value.encode("latin-1")))
    return headers


async def send_reply(reply: Reply, listener: Listener, send: Send) -> None:
    """Sends the reply; a stream is watched by `listener` (started now if the body was not read)
    until its end. Raises CancelledError when the client left (`listener.gone`)."""
    if reply.stream is None:
        listener.stop()  # the answer is whole: nothing left that the client's leaving could stop
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": _headers(reply, len(reply.body))})
        await send({"type": "http.response.body", "body": reply.body, "more_body": False})
        return
    stream = reply.stream
    listener.listen()
    try:
        await send({"type": "http.response.start", "status": reply.status, "headers": _headers(reply, None)})
        async for piece in stream:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        listener.stop()
        # the journey's iterator ends here whatever happened: its Flight settles the request
        with contextlib.suppress(Exception):
            await stream.aclose()
        if reply.abandon is not None:
            reply.abandon()  # never started (the client left during the headers' write): ends it


async def serve(journey: Journey, surface: Surface, scope: Scope, receive: Receive, send: Send,
                max_body: int) -> None:
    listener = Listener(receive)
    if scope["method"] != "POST":
        status, headers, body = surface.error(BridgeError(
            Kind.invalid_request, f"{scope['method']} is not allowed here; send a POST.", status=405))
        await send_reply(Reply(status=status, headers={**headers, "allow": "POST"}, body=body), listener, send)
        return
    try:
        headers = scope["headers"]
        reply = await journey.handle(surface, api_key(headers),
                                     body_reader(receive, max_body, listener.listen_soon, headers))
        await send_reply(reply, listener, send)
    except ClientDisconnected:
        return
    except asyncio.CancelledError:
        if not listener.gone:
            raise
        # the client left: its Flight has ended the request (`Journey.handle`, or the stream's
        # end); nothing more to do, and this task lives on normally
        if listener.task.uncancel() > 0:  # type: ignore[union-attr]
            raise  # cancelled by someone else too (the server's shutdown): theirs to finish
    finally:
        listener.stop()
