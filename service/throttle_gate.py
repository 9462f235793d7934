"""The failed-authentication throttle, applied before a request reaches its handler.

The journey authenticates a key before it reads the body (bridge/journey.py) and answers an
unknown key itself (401, with its access line); it does not know the client's address, and it
turns any exception from its KeyAuthority into a 503. So the throttle's two halves sit here and
in `service.throttle.GuardedAuthenticator`:
- this ASGI middleware records the client's address for the request (a context variable), and
  on the paths that take a key (the surfaces, count_tokens, responses and its WebSocket, the
  model list) answers an address past its limit at once, 429 with Retry-After in the caller's
  protocol (a WebSocket upgrade is refused), without a database lookup or reading the body;
- the GuardedAuthenticator, the journey's KeyAuthority, counts each unknown key it looks up
  against that address.
The paths without a body (the quota API) pass the address to the authenticator themselves.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

from bridge import shapes
from bridge.asgi import api_key

from . import keys
from .throttle import AuthThrottle, calling_client

access = logging.getLogger("codeplan.access")


async def refused(scope: dict, send: Any, gated: frozenset[str], throttle: Callable[[Any], AuthThrottle]) -> bool:
    """Record the client's address for the request; on a gated path, answer an address past its
    limit (429, or a refused WebSocket upgrade) and return True: the request goes no further."""
    client = scope.get("client")
    address = client[0] if client else None
    calling_client.set(address)
    # a path under a gated one is gated too: GET /v1/models/{id} costs a key lookup as the list does
    if scope["type"] not in ("http", "websocket") or (
            scope["path"] not in gated and scope["path"].rpartition("/")[0] not in gated):
        return False
    gate = throttle(scope)
    if not gate.watching(address):
        return False  # nearly always: no need to find the key, let alone hash it
    key = api_key(scope["headers"])
    wait = gate.retry_after(address, keys.key_hash(key)) if key else None
    if wait is None:
        return False
    started = time.monotonic()
    seconds = str(max(1, int(wait + 0.999)))
    if scope["type"] == "websocket":
        # refused before the upgrade is accepted: the client sees an HTTP 403
        await send({"type": "websocket.close", "code": 1008})
        return True
    answer = shapes.render(scope["path"], 429, "Too many requests with unknown API keys from "
                           f"your address; retry in {seconds} s.", "rate_limit_exceeded")
    await send({"type": "http.response.start", "status": answer.status, "headers": [
        (b"content-type", answer.content_type.encode()),
        (b"content-length", str(len(answer.body)).encode()),
        (b"retry-after", seconds.encode()), (b"x-should-retry", b"true")]})
    await send({"type": "http.response.body", "body": answer.body})
    access.info("request", extra={
        "request_id": None, "surface": None, "path": scope["path"], "model": None, "status": 429,
        "account_id": None, "prompt_tokens": 0, "completion_tokens": 0, "billed": 0,
        "overhead_ms": round((time.monotonic() - started) * 1000, 2), "upstream_ms": 0.0,
        "outcome": "refused: authentication throttled"})
    return True


def throttle_gate(paths: Iterable[str], throttle: Callable[[Any], AuthThrottle]):
    """Litestar middleware; `throttle(scope)` finds the throttle (built in the app's lifespan).
    The bridge's hot routes bypass Litestar (service/app.py) and call `refused` themselves."""
    gated = frozenset(paths)

    def middleware(app: Any) -> Any:
        async def gate(scope: dict, receive: Any, send: Any) -> None:
            if not await refused(scope, send, gated, throttle):
                await app(scope, receive, send)
        return gate

    return middleware
