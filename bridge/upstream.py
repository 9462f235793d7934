"""The upstream client: one pooled aiohttp session, the key pool, retries before the first byte,
and whether to ask for stream usage.

OpenAI-style servers (vLLM, SGLang, most hosted GLM providers) report usage in a stream only
when the request carries `stream_options.include_usage`; Z.ai's and Zhipu's own APIs send it
unasked and do not list the field. So asking is a setting whose default (`auto`) asks every
upstream but those hosts, and an upstream that refuses the field (a 400 naming it) is
remembered and the request resent without it, before any byte reaches the client.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import urllib.parse
from typing import Callable, Literal

import aiohttp
import msgspec

from . import glm, wire
from .errors import BridgeError, Kind

log = logging.getLogger("codeplan.upstream")

_ATTEMPTS = 2
# failures another attempt (on another key) may well not meet; never a refusal of the request
_RETRY_ON = {Kind.upstream_error, Kind.upstream_rate_limited, Kind.upstream_overloaded}


class _RefusedStreamOptions(Exception):
    pass


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
    """An upstream response that gives its key's slot back, once, when it is ended. It names the
    upstream profile that answered and that profile's price for the model (bridge/upstreams.py),
    so the settlement can record what the request cost."""

    __slots__ = ("_response", "_on_done", "content", "profile", "price")

    def __init__(self, response: aiohttp.ClientResponse, on_done: Callable[[], None],
                 profile: str | None = None, price=None) -> None:
        self._response = response
        self._on_done: Callable[[], None] | None = on_done
        self.content = response.content
        self.profile = profile
        self.price = price

    async def read(self) -> bytes:
        return await self._response.read()

    def end(self) -> None:
        """Give the connection back to the pool when the body was read to its end (it can be
        reused), close it otherwise (the upstream stops sending); free the key's slot."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()
        self._done()

    def close(self) -> None:
        self._response.close()
        self._done()

    def _done(self) -> None:
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done()


# Z.ai's and Zhipu's own APIs send stream usage unasked (glm-upstream.md §5.2, §16)
_USAGE_UNASKED_HOSTS = {"api.z.ai", "open.bigmodel.cn", "dev.bigmodel.cn"}

StreamUsage = Literal["auto", "ask", "never"]


def asks_for_usage(base_url: str, setting: StreamUsage) -> bool:
    if setting != "auto":
        return setting == "ask"
    return (urllib.parse.urlsplit(base_url).hostname or "") not in _USAGE_UNASKED_HOSTS


def _refuses_stream_options(status: int, body: bytes) -> bool:
    return status in (400, 422) and b"stream_options" in body


class Upstream:
    def __init__(self, base_url: str, keys: tuple[str, ...], *, timeout: float,
                 concurrency: int = 0, stream_usage: StreamUsage = "auto") -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        # how logs name this upstream: its host, never its keys
        self.name = urllib.parse.urlsplit(base_url).netloc or base_url
        self.ask_usage = asks_for_usage(base_url, stream_usage)
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
        if request.stream and self.ask_usage:
            request.stream_options = wire.StreamOptions(include_usage=True)
        body = wire.encoder.encode(request)
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return await self._send(body, request_id)
            except _RefusedStreamOptions:
                # remembered for every later request; this one is resent at once, unchanged
                # otherwise, and the resend is not one of its attempts
                log.warning("upstream refuses stream_options; no longer asking it for stream usage",
                            extra={"upstream": self.name})
                self.ask_usage = False
                request.stream_options = msgspec.UNSET
                return await self.open(request, request_id)
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
            if self.ask_usage and _refuses_stream_options(response.status, error_body):
                raise _RefusedStreamOptions()
            raise glm.upstream_error(response.status, error_body, request_id)
        return UpstreamResponse(response, lambda: self._pool.release(slot))
