"""Who may use the admin API: the operator's token (CODEPLAN_ADMIN_TOKEN), the API key of an
admin account, or an admin's web session (reads only: a cookie rides along on cross-site
requests, so changes need a bearer credential). Anyone else known gets 403, strangers 401."""
from __future__ import annotations

import hmac

import asyncpg
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from .. import keys
from ..web import sessions

_KEY_SQL = """
SELECT a.id, a.is_admin FROM api_keys k JOIN accounts a ON a.id = k.account_id
 WHERE k.secret_hash = $1 AND k.revoked_at IS NULL
"""


def _bearer(connection: ASGIConnection) -> str:
    auth = connection.headers.get("authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (connection.headers.get("x-api-key") or "").strip()


async def admin_only(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard of every admin route; leaves the actor's name in `connection.state.actor`."""
    config = connection.app.state.config
    pool: asyncpg.Pool = connection.app.state.pool
    credential = _bearer(connection)
    if credential:
        if config.admin_token and hmac.compare_digest(credential.encode(), config.admin_token.encode()):
            connection.state.actor = "admin-token"
            return
        row = await pool.fetchrow(_KEY_SQL, keys.key_hash(credential))
        if row is None:
            raise NotAuthorizedException("Send an admin token or an admin account's API key as a Bearer token.")
        if not row["is_admin"]:
            raise PermissionDeniedException("This key's account is not an administrator.")
        connection.state.actor = f"account:{row['id']}"
        return
    # the web page's session, by its own rules (idle and absolute lifetimes)
    viewer = await sessions.lookup(pool, connection.cookies.get(sessions.COOKIE))
    if viewer is not None:
        if not viewer.is_admin:
            raise PermissionDeniedException("This account is not an administrator.")
        if connection.scope["method"] not in ("GET", "HEAD"):
            raise PermissionDeniedException("Changes need a bearer credential, not a session cookie.")
        connection.state.actor = f"account:{viewer.account_id}"
        return
    raise NotAuthorizedException("Send an admin token or an admin account's API key as a Bearer token.")
