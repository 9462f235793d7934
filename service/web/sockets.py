"""Live usage over WebSockets: the dashboard's (session cookie) and the IDEs' (API key).

`/live`: the signed-in browser's own subscription; the Origin must be this site's, so another
site cannot open it with the visitor's cookie. `/v1/usage/live`: for plugins and status lines,
the key in `Authorization: Bearer` / `x-api-key`, or as the first message
`{"type": "auth", "key": "cp_..."}`. Both send a `usage` message at once and after every change.

The key is looked up by the application's authenticator, like every other key: behind the
failed-authentication throttle (service/throttle.py), so a socket is no cheaper way to guess
keys than a request (an address past its limit is closed with 4429 and no query), and with the
same cache of principals and of unknown keys.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from bridge.app import api_key

from ..throttle import GuardedAuthenticator, Throttled
from . import live, sessions

log = logging.getLogger("codeplan.live")

AUTH_TIMEOUT = 10.0
CLOSE_UNAUTHORIZED = 4401
CLOSE_NO_PLAN = 4402
CLOSE_FORBIDDEN = 4403
CLOSE_THROTTLED = 4429
CLOSE_TRY_AGAIN = 1013  # RFC 6455 "Try Again Later": the database is away for a moment


class AuthMessage(msgspec.Struct, tag="auth", tag_field="type"):
    key: str


_auth_decoder = msgspec.json.Decoder(AuthMessage)


async def current_subscription(pool: asyncpg.Pool, account_id: int) -> int | None:
    return await pool.fetchval(
        "SELECT id FROM subscriptions WHERE account_id = $1 AND status <> 'canceled'"
        " ORDER BY id DESC LIMIT 1", account_id)


async def _refuse(socket: WebSocket, code: int, error: str, message: str) -> None:
    await socket.send_text(msgspec.json.encode(live.LiveError(code=error, message=message)).decode())
    await socket.close(code=code, reason=error)


async def _drain(socket: WebSocket) -> None:
    """Read (and ignore) what the client sends, so its leaving is noticed at once."""
    try:
        while True:
            await socket.receive_data(mode="text")
    except WebSocketDisconnect:
        return


async def _pump(socket: WebSocket, subscription_id: int,
                allowed: Callable[[], Awaitable[bool]] | None = None) -> None:
    hub: live.UsageHub = socket.app.state.usage_hub
    pool: asyncpg.Pool = socket.app.state.pool
    watcher = hub.watch(subscription_id)
    reader = asyncio.create_task(_drain(socket))
    try:
        watcher.offer(await live.snapshot(pool, subscription_id))
        while True:
            getter = asyncio.ensure_future(watcher.next())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                getter.cancel()
                return
            if allowed is not None and not await allowed():
                await _refuse(socket, CLOSE_UNAUTHORIZED, "key_revoked", "This API key was revoked.")
                return
            await socket.send_text(msgspec.json.encode(getter.result()).decode())
    except WebSocketDisconnect:
        return
    finally:
        hub.unwatch(watcher)
        reader.cancel()


def _same_origin(socket: WebSocket) -> bool:
    origin = socket.headers.get("origin")
    host = socket.headers.get("host")
    return bool(origin and host) and urlsplit(origin).netloc.lower() == host.lower()  # type: ignore[union-attr]


@websocket("/live")
async def browser_live(socket: WebSocket) -> None:
    if not _same_origin(socket):
        await socket.close(code=CLOSE_FORBIDDEN, reason="cross-origin")
        return
    pool: asyncpg.Pool = socket.app.state.pool
    viewer = await sessions.lookup(pool, socket.cookies.get(sessions.COOKIE))
    await socket.accept()
    if viewer is None:
        await _refuse(socket, CLOSE_UNAUTHORIZED, "not_signed_in", "Sign in again.")
        return
    subscription_id = await current_subscription(pool, viewer.account_id)
    if subscription_id is None:
        await _refuse(socket, CLOSE_NO_PLAN, "no_subscription", "This account has no plan yet.")
        return

    async def session_alive() -> bool:
        return await sessions.lookup(pool, socket.cookies.get(sessions.COOKIE)) is not None
    await _pump(socket, subscription_id, session_alive)


@websocket("/v1/usage/live")
async def key_live(socket: WebSocket) -> None:
    pool: asyncpg.Pool = socket.app.state.pool
    auth: GuardedAuthenticator = socket.app.state.auth
    await socket.accept()
    key = api_key(socket)
    if not key:
        try:
            first = await asyncio.wait_for(socket.receive_data(mode="text"), AUTH_TIMEOUT)
            key = _auth_decoder.decode(first).key.strip()
        except (TimeoutError, msgspec.DecodeError, msgspec.ValidationError):
            await _refuse(socket, CLOSE_UNAUTHORIZED, "invalid_api_key",
                          'Send your key as `Authorization: Bearer <key>` or first message '
                          '{"type": "auth", "key": "<key>"}.')
            return
        except WebSocketDisconnect:
            return
    try:
        principal = await auth.authenticate(key, socket.client.host if socket.client else None)
    except Throttled as exc:
        await _refuse(socket, CLOSE_THROTTLED, "rate_limit_exceeded", "Too many requests with unknown "
                      f"API keys from your address; retry in {exc.retry_after_header} s.")
        return
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("live usage: database unavailable", extra={"error": type(exc).__name__})
        await _refuse(socket, CLOSE_TRY_AGAIN, "unavailable",
                      "The service cannot reach its database right now; reconnect in a few seconds.")
        return
    if principal is None:
        await _refuse(socket, CLOSE_UNAUTHORIZED, "invalid_api_key", "Invalid API key.")
        return
    if principal.subscription_id is None:
        base = socket.app.state.config.base_url
        await _refuse(socket, CLOSE_NO_PLAN, "no_subscription",
                      f"This account has no plan: choose one at {base}/billing")
        return
    key_id = principal.api_key_id

    async def key_alive() -> bool:
        # by the key's id, not its secret: a revocation closes the socket at the next change,
        # whatever the authenticator's cache still holds
        return bool(await pool.fetchval("SELECT revoked_at IS NULL FROM api_keys WHERE id = $1", key_id))
    await _pump(socket, principal.subscription_id, key_alive)


routes = [browser_live, key_live]
