"""Who may use the admin API: the operator's token (CODEPLAN_ADMIN_TOKEN), the API key of an
admin account, or an admin's web session (reads only: a cookie rides along on cross-site
requests, so changes need a bearer credential). A suspended admin account is no admin. Anyone
else known gets 403, strangers 401.

A bearer that is not the operator's token is looked up by the application's authenticator, like
every key: behind the failed-authentication throttle (an address guessing keys here gets 429
without a query, service/throttle.py) and its caches."""
from __future__ import annotations

import hmac

import asyncpg
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import ResponseSpec

from bridge.app import api_key

from ..problems import problem_responses
from ..throttle import GuardedAuthenticator
from ..web import sessions


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """What an admin route documents besides its answer: its own refusals, the guard's (401,
    403, 429) and an outage of the database (503), all as problem details."""
    return problem_responses(*sorted({*statuses, 401, 403, 429, 503}))


async def admin_only(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard of every admin route; leaves the actor's name in `connection.state.actor`."""
    config = connection.app.state.config
    pool: asyncpg.Pool = connection.app.state.pool
    credential = api_key(connection)
    if credential:
        if config.admin_token and hmac.compare_digest(credential.encode(), config.admin_token.encode()):
            connection.state.actor = "admin-token"
            return
        auth: GuardedAuthenticator = connection.app.state.auth
        # raises Throttled (429) for an address past its limit of unknown keys
        principal = await auth.authenticate(credential, connection.client.host if connection.client else None)
        if principal is None:
            raise NotAuthorizedException("Send an admin token or an admin account's API key as a Bearer token.")
        admin = await pool.fetchrow("SELECT is_admin, suspended_at IS NOT NULL AS suspended FROM accounts"
                                    " WHERE id = $1", principal.account_id)
        if admin is None or not admin["is_admin"]:
            raise PermissionDeniedException("This key's account is not an administrator.")
        # suspension withdraws admin rights too: else a suspended admin could restore itself
        if admin["suspended"]:
            raise PermissionDeniedException("This key's account is suspended.")
        connection.state.actor = f"account:{principal.account_id}"
        return
    # the web page's session, by its own rules (idle and absolute lifetimes)
    viewer = await sessions.lookup(pool, connection.cookies.get(sessions.COOKIE))
    if viewer is not None:
        if not viewer.is_admin:
            raise PermissionDeniedException("This account is not an administrator.")
        if viewer.suspended:
            raise PermissionDeniedException("This account is suspended.")
        if connection.scope["method"] not in ("GET", "HEAD"):
            raise PermissionDeniedException("Changes need a bearer credential, not a session cookie.")
        connection.state.actor = f"account:{viewer.account_id}"
        return
    raise NotAuthorizedException("Send an admin token or an admin account's API key as a Bearer token.")
