"""The GLM client: one pooled aiohttp session, the coding-plan key pool, Z.ai error mapping."""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable

import aiohttp
import msgspec

from . import wire
from .errors import BridgeError, Kind

log = logging.getLogger("codeplan.upstream")

_ATTEMPTS = 2
# failures another attempt (on another key) may well not meet; never a refusal of the request
_RETRY_ON = {Kind.upstream_error, Kind.upstream_rate_limited, Kind.upstream_overloaded}


def map_error(status: int, body: bytes, request_id: str) -> BridgeError:
    """A Z.ai error response, as the taxonomy sees it. GLM's own wording is kept where clients
    match on it; our upstream keys and plan state are never shown."""
    try:
        detail = wire.error_decoder.decode(body).error
        code, message = detail.code, detail.message
    except msgspec.DecodeError:
        code, message = "", ""
    message = message or f"upstream answered HTTP {status}"
    if code in ("1113", "1309"):
        return BridgeError(Kind.upstream_billing,
                           f"The model provider refused the request for billing reasons ({code}); "
                           f"this is not retryable. Request id {request_id}.", code=code)
    if code in ("1302", "1303"):
        return BridgeError(Kind.upstream_rate_limited, message, code=code, retry_after=2)
    if code in ("1305",) or status == 529:
        return BridgeError(Kind.upstream_overloaded, message, code=code, retry_after=5)
    if code in ("1308", "1310", "1316", "1317", "1318", "1319", "1320", "1321"):
        # our own upstream plan ran dry: a capacity problem on our side, retry later
        return BridgeError(Kind.upstream_overloaded,
                           f"The service is at capacity; retry shortly. Request id {request_id}.",
                           code=code, retry_after=30)
    if code == "1301":
        return BridgeError(Kind.content_policy, message, code=code)
    if code == "1261":
        return BridgeError(Kind.context_length, message, code="context_length_exceeded")
    if status == 401 or code in ("1000", "1001", "1002", "1003", "1004"):
        log.error("upstream rejected our key", extra={"status": status, "code": code})
        return BridgeError(Kind.upstream_error,
                           f"The model provider rejected the service's credentials. Request id {request_id}.")
    if 400 <= status < 500 and status != 429:
        return BridgeError(Kind.invalid_request, message, code=code or None)
    if status == 429:
        return BridgeError(Kind.upstream_rate_limited, message, code=code or None, retry_after=2)
    return BridgeError(Kind.upstream_error,
                       f"The model provider failed (HTTP {status}). Request id {request_id}.",
                       code=code or None)


class KeyPool:
    """The coding-plan keys, each with at most `limit` requests in flight (0: no limit).

    Z.ai caps concurrency per key (1302); queueing here costs a short wait instead of an error
    the client must retry. A request takes the least busy key, the next in turn among equals.
    The cap holds within one process.
    """

    def __init__(self, keys: tuple[str, ...], limit: int) -> None:
        self.keys = keys
        self._limit = limit
        self._busy = [0] * len(keys)
        self._turn = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self) -> int:
        while True:
            n = len(self.keys)
            index = min(range(n), key=lambda k: (self._busy[k], (k - self._turn) % n))
            if not self._limit or self._busy[index] < self._limit:
                self._busy[index] += 1
                self._turn = (index + 1) % n
                return index
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass on the turn this waiter was given
                raise

    def release(self, index: int) -> None:
        self._busy[index] -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class UpstreamResponse:
    """An upstream response that gives its key's slot back when it is released or closed."""

    __slots__ = ("_response", "_on_done", "content")

    def __init__(self, response: aiohttp.ClientResponse, on_done: Callable[[], None]) -> None:
        self._response = response
        self._on_done: Callable[[], None] | None = on_done
        self.content = response.content

    async def read(self) -> bytes:
        return await self._response.read()

    def release(self) -> None:
        self._response.release()
        self._done()

    def close(self) -> None:
        self._response.close()
        self._done()

    def _done(self) -> None:
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done()


class Upstream:
    def __init__(self, base_url: str, keys: tuple[str, ...], *, timeout: float,
                 concurrency: int = 0) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._pool = KeyPool(keys, concurrency)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        # no Accept-Encoding: a compressed SSE stream costs CPU per chunk and may be buffered
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def open(self, request: wire.ChatRequest, request_id: str) -> UpstreamResponse:
        """Send the request; return the response once its status is a success.

        Raises BridgeError for an upstream refusal (the body is read and mapped) or when the
        upstream cannot be reached. Nothing has been streamed to the client at that point.
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        body = wire.encoder.encode(request)
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return await self._send(body, request_id)
            except BridgeError as error:
                # nothing has reached the client yet: a transient failure gets one more try,
                # on the next key of the pool
                if attempt == _ATTEMPTS or error.kind not in _RETRY_ON:
                    raise
                log.warning("upstream attempt failed; retrying",
                            extra={"kind": error.kind.value, "code": error.code, "attempt": attempt})
        raise AssertionError("unreachable")

    async def _send(self, body: bytes, request_id: str) -> UpstreamResponse:
        slot = await self._pool.acquire()
        headers = {
            "authorization": "Bearer " + self._pool.keys[slot],
            "content-type": "application/json",
            "accept-language": "en-US,en",
        }
        try:
            response = await self._session.post(self._url, data=body, headers=headers)
        except (aiohttp.ClientError, OSError) as exc:
            self._pool.release(slot)
            log.warning("upstream unreachable", extra={"error": type(exc).__name__})
            raise BridgeError(Kind.upstream_error,
                              f"The model provider could not be reached. Request id {request_id}.") from None
        except BaseException:
            self._pool.release(slot)
            raise
        if response.status >= 400:
            try:
                error_body = await response.read()
            except (aiohttp.ClientError, OSError):
                error_body = b""
            finally:
                response.release()
                self._pool.release(slot)
            raise map_error(response.status, error_body, request_id)
        return UpstreamResponse(response, lambda: self._pool.release(slot))
