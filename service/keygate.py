"""The key is checked before the body is read, on the paths that take big bodies.

Without it a handler reads the whole body (up to the body limit) and only then learns the key
is unknown: eight unauthenticated 60 MB POSTs took the server from 331 MB to 725 MB. This ASGI
middleware looks at the request's headers first: no key, an unknown key or a throttled address
is answered at once, in the caller's protocol, and the body is never held: what arrives of it
afterwards is parsed and dropped by the HTTP server (closing instead would reset a client still
busy writing, before it could read the answer). A known key passes through; the handler's own
authentication then finds it in the authenticator's cache.

It decides nothing about a known key (its plan, its subscription's standing, its models): that
stays with the request's journey. A database failure while looking the key up also passes
through, for the journey to answer as it answers any.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import asyncpg

from bridge import shapes
from bridge.asgi import api_key

from .throttle import GuardedAuthenticator, Throttled

log = logging.getLogger("codeplan.keygate")

INVALID_KEY = "Invalid API key. Create one with `codeplan keys create` and send it as a Bearer token."
NO_KEY = "No API key. Send your Codeplan key as `Authorization: Bearer <key>` or `x-api-key`."


def key_gate(paths: Iterable[str], authenticator: Callable[[Any], GuardedAuthenticator]):
    """Litestar middleware for POSTs to `paths`; `authenticator(scope)` finds the authenticator
    (built in the app's lifespan, so looked up per request)."""
    gated = frozenset(paths)

    def middleware(app: Any) -> Any:
        async def gate(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in gated:
                await app(scope, receive, send)
                return
            key = api_key(scope["headers"])
            client = scope.get("client")
            try:
                principal = await authenticator(scope).authenticate(key, client[0] if client else None) \
                    if key else None
            except Throttled as refusal:
                await _refuse(send, scope["path"], 429, "Too many requests with unknown API keys from "
                              f"your address; retry in {refusal.retry_after_header} s.", "rate_limit_exceeded",
                              [(b"retry-after", refusal.retry_after_header.encode()),
                               (b"x-should-retry", b"true")])
                return
            except (OSError, asyncpg.PostgresError):
                await app(scope, receive, send)  # the journey meets the same failure and answers it
                return
            if principal is None:
                await _refuse(send, scope["path"], 401, INVALID_KEY if key else NO_KEY, "invalid_api_key",
                              [(b"x-should-retry", b"false")])
                return
            await app(scope, receive, send)
        return gate

    return middleware


async def _refuse(send: Any, path: str, status: int, message: str, code: str,
                  headers: list[tuple[bytes, bytes]]) -> None:
    answer = shapes.render(path, status, message, code)
    await send({"type": "http.response.start", "status": answer.status, "headers": [
        (b"content-type", answer.content_type.encode()),
        (b"content-length", str(len(answer.body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": answer.body})
