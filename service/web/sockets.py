"""Live usage over WebSockets: the dashboard's (session cookie) and the IDEs' (API key).

`/live`: the signed-in browser's own subscription; the Origin must be this site's, so another
site cannot open it with the visitor's cookie. `/v1/usage/live`: for plugins and status lines,
the key in `Authorization: Bearer` / `x-api-key`, or as the first message
`{"type": "auth", "key": "cp_..."}`. Both send a `usage` message at once and after every change:
a settlement, and the changes time makes (a window's end, 00:00 UTC for `today`), for which the
hub reads the figures again when the last ones sent say they come (live.UsageHub.shown).

The key is looked up by the application's authenticator, like every other key: behind the
failed-authentication throttle (service/throttle.py), so a socket is no cheaper way to guess
keys than a request (an address past its limit is closed with 4429 and no query), and with the
same cache of principals and of unknown keys.

A socket follows its account: at every change, and every ALIVE_EVERY seconds while none comes
(so a logout, a password reset or a revocation closes an idle socket within that bound), its
session (or key) is checked again; and when another subscription of the account is notified (a
new one after a cancel) the account's current subscription is looked up again and the socket
moves to it. A database that is away closes a socket with 1013 (try again), at the handshake or
later, never a crash.
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

from .. import db
from ..throttle import GuardedAuthenticator, Throttled
from . import live, sessions

log = logging.getLogger("codeplan.live")

AUTH_TIMEOUT = 10.0
# An idle socket checks its session (or key) again this often: a logout, a password reset or a
# revocation closes it within this bound, though no usage arrives (one indexed query per socket).
ALIVE_EVERY = 15.0
CLOSE_UNAUTHORIZED = 4401
CLOSE_NO_PLAN = 4402
CLOSE_FORBIDDEN = 4403
CLOSE_THROTTLED = 4429
CLOSE_TRY_AGAIN = 1013  # RFC 6455 "Try Again Later": the database is away for a moment
# what a socket meets when the database is away: a try-again, never an unhandled exception
DATABASE_AWAY = (*db.UNAVAILABLE, asyncpg.PostgresError)


class Refusal(msgspec.Struct, frozen=True):
    """Why a socket is closed: its close code, its error code, and the message sent before."""
    close: int
    code: str
    message: str


UNAVAILABLE = Refusal(CLOSE_TRY_AGAIN, "unavailable",
                      "The service cannot reach its database right now; reconnect in a few seconds.")
NO_PLAN = Refusal(CLOSE_NO_PLAN, "no_subscription", "This account has no plan yet.")
SESSION_ENDED = Refusal(CLOSE_UNAUTHORIZED, "session_ended", "Sign in again.")
KEY_REVOKED = Refusal(CLOSE_UNAUTHORIZED, "key_revoked", "This API key was revoked.")


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


async def _database_away(socket: WebSocket, exc: BaseException) -> None:
    log.warning("live usage: database unavailable", extra={"error": type(exc).__name__})
    await _refuse(socket, UNAVAILABLE.close, UNAVAILABLE.code, UNAVAILABLE.message)


async def _drain(socket: WebSocket) -> None:
    """Read (and ignore) what the client sends, so its leaving is noticed at once."""
    try:
        while True:
            await socket.receive_data(mode="text")
    except WebSocketDisconnect:
        return


async def _pump(socket: WebSocket, account_id: int, subscription_id: int,
                alive: Callable[[], Awaitable[Refusal | None]]) -> None:
    """Send the figures of the account's subscription at once and after every change. Before
    each, and every ALIVE_EVERY seconds without one, `alive()` (the session's or the key's
    check) may refuse; when another subscription of the account moved, the account's current
    one is looked up and the socket follows it."""
    hub: live.UsageHub = socket.app.state.usage_hub
    pool: asyncpg.Pool = socket.app.state.pool
    watcher = hub.watch(subscription_id, account_id)
    reader = asyncio.create_task(_drain(socket))

    async def verdict(value: live.LiveUsage | None) -> Refusal | None:
        # (only the database's calls are guarded: a client that left raises OSError too)
        try:
            refusal = await alive()
            if refusal is None and value is None:  # which subscription is the account's now?
                current = await current_subscription(pool, account_id)
                if current is None:
                    return NO_PLAN
                if current != watcher.subscription_id:
                    hub.move(watcher, current)
                    watcher.offer(await live.snapshot(pool, current, account_id))
            return refusal
        except DATABASE_AWAY as exc:
            log.warning("live usage: database unavailable", extra={"error": type(exc).__name__})
            return UNAVAILABLE

    async def verdict_alone() -> Refusal | None:
        # the periodic check of an idle socket: the session or key only, nothing looked up besides
        try:
            return await alive()
        except DATABASE_AWAY as exc:
            log.warning("live usage: database unavailable", extra={"error": type(exc).__name__})
            return UNAVAILABLE
    try:
        try:
            watcher.offer(await live.snapshot(pool, subscription_id, account_id))
        except DATABASE_AWAY as exc:
            await _database_away(socket, exc)
            return
        getter: asyncio.Future | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(watcher.next())
                done, _ = await asyncio.wait({getter, reader}, timeout=ALIVE_EVERY,
                                             return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    return
                if getter in done:
                    value, getter = getter.result(), None
                    refusal = await verdict(value)
                else:  # nothing for ALIVE_EVERY seconds: is the session (or key) still there?
                    value = None
                    refusal = await verdict_alone()
                if refusal is not None:
                    await _refuse(socket, refusal.close, refusal.code, refusal.message)
                    return
                if value is not None:
                    await socket.send_text(msgspec.json.encode(value).decode())
                    hub.shown(value)  # read again when a window ends or the day does
        finally:
            if getter is not None:
                getter.cancel()
    except WebSocketDisconnect:
        return
    finally:
        hub.unwatch(watcher)
        reader.cancel()


def session_check(pool: asyncpg.Pool, token: str | None) -> Callable[[], Awaitable[Refusal | None]]:
    """`/live`'s `alive()`: its session still there."""
    async def session_alive() -> Refusal | None:
        # logged out, or every session ended (a password reset): the page is told to sign in
        # (not a use of the session: an open tab alone does not keep it from ending when idle)
        ended = await sessions.lookup(pool, token, touch=False) is None
        return SESSION_ENDED if ended else None
    return session_alive


def key_check(pool: asyncpg.Pool, key_id: int) -> Callable[[], Awaitable[Refusal | None]]:
    """`/v1/usage/live`'s `alive()`: its key not revoked."""
    async def key_alive() -> Refusal | None:
        # by the key's id, not its secret: a revocation closes the socket at the next change (or
        # check, ALIVE_EVERY), whatever the authenticator's cache still holds
        alive = await pool.fetchval("SELECT revoked_at IS NULL FROM api_keys WHERE id = $1", key_id)
        return None if alive else KEY_REVOKED
    return key_alive


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
    await socket.accept()
    try:
        viewer = await sessions.lookup(pool, socket.cookies.get(sessions.COOKIE))
        subscription_id = None if viewer is None else await current_subscription(pool, viewer.account_id)
    except DATABASE_AWAY as exc:
        await _database_away(socket, exc)
        return
    if viewer is None:
        await _refuse(socket, CLOSE_UNAUTHORIZED, "not_signed_in", "Sign in again.")
        return
    if subscription_id is None:
        await _refuse(socket, NO_PLAN.close, NO_PLAN.code, NO_PLAN.message)
        return

    await _pump(socket, viewer.account_id, subscription_id, session_check(pool, socket.cookies.get(sessions.COOKIE)))


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
    except DATABASE_AWAY as exc:
        await _database_away(socket, exc)
        return
    if principal is None:
        await _refuse(socket, CLOSE_UNAUTHORIZED, "invalid_api_key", "Invalid API key.")
        return
    if principal.subscription_id is None:
        base = socket.app.state.config.base_url
        await _refuse(socket, CLOSE_NO_PLAN, "no_subscription",
                      f"This account has no plan: choose one at {base}/billing")
        return
    await _pump(socket, principal.account_id, principal.subscription_id, key_check(pool, principal.api_key_id))


routes = [browser_live, key_live]
