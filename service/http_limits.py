"""Limits uvicorn's HTTP server lacks, added to its httptools protocol by subclassing.

What uvicorn (0.54, with httptools) offers and what it does not, read from its source:
- keep-alive idle timeout: `timeout_keep_alive`, armed after each response. Used as is.
- no limit on the request line and headers (httptools buffers a header of any size), no
  deadline for a request's head (a connection that sends nothing, or a byte a minute, stays
  open forever: slowloris), no body size limit, and `limit_concurrency` answers a text/plain
  503 only after reading the request. (h11's `h11_max_incomplete_event_size` does not apply
  to httptools.) Parse errors get a text/plain 400.

`LimitedHttpToolsProtocol` adds, per connection, in the parser's callbacks:
- request line + headers over `max_header_bytes`: 414 (URL alone) or 431. Measured exactly once
  the head is complete, and from the raw bytes while it is not, so a giant header is stopped
  within one socket read (<= 256 KB) of the limit rather than after httptools buffered it all;
- a head not complete `header_timeout` seconds after the connection opened (or after the next
  request's first byte): 408 and closed;
- a Content-Length over `max_body_bytes`: 413 before a byte of the body is read; a chunked body
  counted as it arrives and refused the moment it passes the limit; a body not complete
  `body_timeout` seconds after its head: 408;
- more than `max_connections` open: the newcomer's request gets a 503 with Retry-After as soon as
  its head is read (it may take 1 s at most); past a further margin, new connections are closed
  at once, so a flood of sockets cannot exhaust file descriptors;
- parse errors (bad method, bad framing): a 400.
Every answer comes from `bridge.shapes.render`, in the protocol of the request's path, with
`connection: close`. After a refusal the connection lingers up to `linger` seconds reading and
discarding what the client still sends, so a client busy writing a large body gets to read the
answer instead of a reset.

Refusals are counted and logged in one line at most every 10 seconds (the tally since the last
line), never with a header's content; uvicorn's own warning per malformed request is silenced,
so a flood of them cannot flood the log (its errors still reach it).

WebSockets: uvicorn applies one message limit (`ws_max_size`) to every socket, and websockets'
parser buffers a frame whole, up to that limit, before the application sees a byte of it. The
Responses socket needs the body limit (a frame is a whole turn), but the live-usage sockets take
a 100-byte `auth` message at most, which they read before the key is known: with the body limit
there, a stranger's frames made the server hold 32 MB each. `LimitedWebSocketProtocol` (uvicorn's
own choice, websockets' sans-I/O protocol) starts every socket at `SMALL_WS_MESSAGE` and gives
the body limit only to the paths that need it, when the upgrade request is read: before any
byte that follows it (uvicorn hands the protocol the request alone), and a frame parsed before
would be held to the small limit. A frame over its limit is refused from its header (close
1009), its payload never read.
"""
from __future__ import annotations

import asyncio
import http
import logging
import time
from collections import Counter
from typing import Any, ClassVar, Iterable
from urllib.parse import unquote

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request as UpgradeRequest

from bridge import shapes

log = logging.getLogger("codeplan.http")
# uvicorn logs "Invalid HTTP request received." for each malformed request: one line per
# attacker's request. The tally above says it once per 10 s; uvicorn's errors still get through.
_server_log = logging.getLogger("codeplan.http.server")
_server_log.setLevel(logging.ERROR)


class HttpLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 30.0
    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout: float = 300.0
    max_connections: int = 8192
    linger: float = 2.0
    # how long a connection over max_connections may take to send the head we answer
    overflow_grace: float = 1.0

    @property
    def hard_connection_cap(self) -> int:
        return self.max_connections + max(16, self.max_connections // 8)


class _Tally:
    """Counts refusals by status; logs them in one line at most every `every` seconds."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.counts: Counter[int] = Counter()
        self.total: Counter[int] = Counter()
        self._next = 0.0

    def add(self, status: int) -> None:
        self.counts[status] += 1
        self.total[status] += 1
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every
            log.warning("requests refused by the HTTP limits",
                        extra={"refused": ",".join(f"{s}:{n}" for s, n in sorted(self.counts.items()))})
            self.counts.clear()


refusals = _Tally()


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())


def _measure(url: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, int, bool]:
    """(bytes of URL and headers, Content-Length or 0, whether a body follows), in one pass."""
    head, length, body = len(url), 0, False
    for name, value in headers:
        head += len(name) + len(value) + 4
        if name == b"content-length":
            # httptools has rejected a malformed one, or two that differ, already
            length = int(value)
            body = body or length > 0
        elif name == b"transfer-encoding":
            body = True
    return head, length, body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above. Use `protocol_class(limits)`."""

    limits: ClassVar[HttpLimits] = HttpLimits()
    # Our state in slots: uvicorn's protocol already has ~30 attributes, and ten more in its
    # __dict__ cost ~1.3 KB per connection (measured over 5,000 open streams); slots, 80 B.
    __slots__ = ("_last_data", "_deadline", "_timer", "_timer_at", "_in_head", "_raw_head", "_body_bytes",
                 "_reading_body", "_over_capacity", "_refused")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _server_log
        self.url = b""
        self._last_data = b""
        # The header or body deadline: a time, checked by one timer per connection that is not
        # moved for every request (two timers set and cancelled per request were ~2% of the
        # bridge's CPU per request): it fires at most once per timeout, and sleeps again until
        # the deadline then current, or stops when there is none.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._in_head = True
        self._raw_head = 0  # socket bytes that arrived while that head was incomplete
        self._body_bytes = 0
        self._reading_body = False  # the application has the request; its body may still arrive
        self._over_capacity = False
        self._refused = False

    # ---- connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        open_now = len(self.connections)
        limits = self.limits
        if open_now > limits.hard_connection_cap:
            refusals.add(0)
            self._refused = True
            transport.close()
            return
        timeout = limits.header_timeout
        if open_now > limits.max_connections:
            self._over_capacity = True
            timeout = min(timeout, limits.overflow_grace)
        self._arm(timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: read and drop
        if self._in_head:
            self._raw_head += len(data)
        self._last_data = data  # for send_400_response: the path of a request httptools rejects
        super().data_received(data)
        self._last_data = b""
        if self._in_head and not self._refused and self._raw_head > self.limits.max_header_bytes:
            self._refuse(431, "The request's headers are too large: the limit is "
                         f"{self.limits.max_header_bytes} bytes.", "request_header_fields_too_large")

    def send_400_response(self, msg: str) -> None:
        # httptools rejected the bytes (bad method, bad framing): same answer, caller's shape
        if not self.url:
            # rejected before its URL was parsed (an unknown method): the request line still
            # says which protocol the caller speaks
            parts = self._last_data[:4096].split(b"\r\n", 1)[0].split(b" ")
            if len(parts) >= 2 and parts[1].startswith(b"/"):
                self.url = parts[1]
        self._refuse(400, "Invalid HTTP request received.", "invalid_http_request")

    # ---- parser callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._in_head = True
        self._reading_body = False
        self._raw_head = self._body_bytes = 0
        if self._deadline is None:  # a later request on a kept-alive connection
            self._arm(self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._in_head = False
        if self._over_capacity:
            self._refuse(503, "The server is at its connection limit; retry in a moment.",
                         "overloaded", retry_after=1)
            return
        head, length, has_body = _measure(self.url, self.headers)
        if head > self.limits.max_header_bytes:
            if len(self.url) > self.limits.max_header_bytes:
                self._refuse(414, "The request's URL is too long: the limit is "
                             f"{self.limits.max_header_bytes} bytes.", "uri_too_long")
            else:
                self._refuse(431, "The request's headers are too large: the limit is "
                             f"{self.limits.max_header_bytes} bytes.", "request_header_fields_too_large")
            return
        if length > self.limits.max_body_bytes:
            self._refuse(413, f"Request entity too large: the body is {length} bytes, the limit "
                         f"is {self.limits.max_body_bytes}.", "request_too_large")
            return
        super().on_headers_complete()
        self._reading_body = True
        if has_body:
            self._arm(self.limits.body_timeout)

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        cycle = self.cycle
        if not cycle.response_complete:
            self._body_bytes += len(body)
            if self._body_bytes > self.limits.max_body_bytes:
                self._refuse(413, "Request entity too large: the body passed the limit of "
                             f"{self.limits.max_body_bytes} bytes.", "request_too_large")
                return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._reading_body = False
        super().on_message_complete()

    # ---- refusing ----------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        loop = self.loop
        deadline = self._deadline = loop.time() + seconds
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._wake)

    def _disarm(self) -> None:
        self._deadline = None

    def _stop_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if deadline > self.loop.time():
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._wake)
            return
        self._expired()

    def _expired(self) -> None:
        self._deadline = None
        if self._refused or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(408, "The request's headers did not arrive in time "
                         f"({self.limits.header_timeout:g} s).", "request_timeout", linger=False)
        else:
            self._refuse(408, "The request's body did not arrive in time "
                         f"({self.limits.body_timeout:g} s).", "request_timeout", linger=False)

    def _refuse(self, status: int, message: str, code: str, *, retry_after: int | None = None,
                linger: bool = True) -> None:
        """Answer `status` in the caller's shape, close, and stop serving this connection."""
        self._refused = True
        self._disarm()
        refusals.add(status)
        transport = self.transport
        cycle = self.cycle
        answered = False  # whether another answer is on its way or out already
        if cycle is not None and not cycle.response_complete:
            # the application is serving a request on this connection: from now on it reads
            # a disconnect and its writes go nowhere
            cycle.disconnected = True
            cycle.message_event.set()
            answered = not self._reading_body or cycle.response_started or bool(self.pipeline)
        elif self._reading_body:
            answered = True  # the application answered this request before its body ended
        if answered:
            transport.close()
            return
        path = self.url.partition(b"?")[0].decode("latin-1")
        answer = shapes.render(path, status, message, code, http_level=True)
        head = [_status_line(status)]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: ", answer.content_type.encode(), b"\r\n",
                 b"content-length: ", str(len(answer.body)).encode(), b"\r\n",
                 b"connection: close\r\n"]
        if retry_after is not None:
            head += [b"retry-after: ", str(retry_after).encode(), b"\r\n"]
        head += [b"\r\n", answer.body]
        transport.write(b"".join(head))
        if linger and transport.can_write_eof():
            transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(self.limits.linger, transport.close)
        else:
            transport.close()


def protocol_class(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class bound to `limits`, for `uvicorn.Config(http=...)`."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


# what a WebSocket message may hold on a path that does not need more: the live-usage sockets'
# `auth` message is ~100 bytes, and they read nothing else that matters
SMALL_WS_MESSAGE = 64 * 1024


class LimitedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol whose message limit is `SMALL_WS_MESSAGE` but on `large_paths`
    (uvicorn's `ws_max_size` there). Use `websocket_protocol_class(paths)`."""

    large_paths: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # small until the path says otherwise: a frame parsed before that is held to it
        self.conn.max_message_size = min(SMALL_WS_MESSAGE, self.config.ws_max_size)

    def handle_connect(self, event: UpgradeRequest) -> None:
        # the parser takes a frame's limit when the frame's first byte arrives: none has yet
        # (uvicorn fed this protocol the upgrade request alone)
        # as the router reads it: Litestar serves `/v1/responses/` as `/v1/responses`
        path = unquote(event.path.partition("?")[0])
        if (path.rstrip("/") or "/") in self.large_paths:
            self.conn.max_message_size = self.config.ws_max_size
        super().handle_connect(event)


def websocket_protocol_class(large_paths: Iterable[str]) -> type[LimitedWebSocketProtocol]:
    """A WebSocket protocol class for `uvicorn.Config(ws=...)`, its `ws_max_size` given to
    `large_paths` only."""
    return type("LimitedWebSocketProtocol", (LimitedWebSocketProtocol,), {"large_paths": frozenset(large_paths)})
