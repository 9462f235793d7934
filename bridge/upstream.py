"""What the journey forwards to (`Upstream`), the response it gets back, and whether to ask an
upstream for stream usage. The client itself, with profiles, keys, retries and the concurrency
cap, is bridge/upstreams.py.

OpenAI-style servers (vLLM, SGLang, most hosted GLM providers) report usage in a stream only
when the request carries `stream_options.include_usage`; Z.ai's and Zhipu's own APIs send it
unasked and do not list the field. So asking is a setting whose default (`auto`) asks every
upstream but those hosts, and an upstream that refuses the field (a 400 naming it) is
remembered and the request resent without it, before any byte reaches the client.
"""
from __future__ import annotations

import logging
import time
import urllib.parse
from typing import Callable, Hashable, Literal, Protocol

import aiohttp

from . import wire

log = logging.getLogger("codeplan.upstream")


class UpstreamResponse:
    """An upstream response that gives its key's slot back, once, when it is ended. It names the
    upstream profile that answered and that profile's price for the model (bridge/upstreams.py),
    so the settlement can record what the request cost.

    It also keeps when the upstream's status and its body's end arrived: an upstream faster than
    the admission answers before the request has heard it, and what the bridge says it spent
    itself (`Flight.overhead_ms`) must count that wait as the bridge's, not the upstream's."""

    __slots__ = ("_response", "_on_done", "content", "profile", "price", "arrived", "_body_done")

    def __init__(self, response: aiohttp.ClientResponse, on_done: Callable[[], None],
                 profile: str | None = None, price=None, *, stream: bool = False) -> None:
        self._response = response
        self._on_done: Callable[[], None] | None = on_done
        self.content = response.content
        self.profile = profile
        self.price = price
        self.arrived = time.monotonic()  # made as the status and headers are read
        # A whole answer's end is stamped by its reader (a stream's relay reads as it comes, so
        # it is not, and an idle stream keeps nothing for it); a closure over a list, so that
        # the reader, which keeps its callbacks until then, keeps nothing of this object
        self._body_done: list[float] | None = None
        if not stream:
            body_done: list[float] = []
            self._body_done = body_done
            response.content.on_eof(lambda: body_done.append(time.monotonic()))

    @property
    def body_done(self) -> float | None:
        """When a whole answer's last byte came, if it has (None for a stream)."""
        return self._body_done[0] if self._body_done else None

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


class Upstream(Protocol):
    """What the journey forwards to: `bridge.upstreams.Router` (profiles, keys, failover)."""

    name: str  # how logs name it before a profile answered

    async def open(self, request: wire.ChatRequest, request_id: str,
                   account: Hashable = None) -> UpstreamResponse:
        """Send the request; return the response once its status is a success (a whole
        answer's: once its body is in and is not a refusal). Raises
        BridgeError for a refusal or when no upstream can be reached; nothing has reached the
        client at that point. `account` (whose request it is) takes turns with the others for
        scarce upstream slots."""
