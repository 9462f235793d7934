"""Server-side sessions: a random token in the cookie, its SHA-256 in `web_sessions`.

The cookie is HttpOnly, SameSite=Lax, and Secure when the public URL is https. A stolen
database gives no usable cookie; logging out, or resetting the password, ends sessions at once.
A closed account has no session: none is made for it, and none is found for it.
"""
from __future__ import annotations

import hashlib
import secrets

import asyncpg
import msgspec
from litestar.datastructures import Cookie

COOKIE = "codeplan_session"
IDLE_DAYS = 14          # a session unused this long ends
MAX_DAYS = 90           # and none lives longer than this, used or not
_TOUCH_SECONDS = 3600   # `seen_at` is written at most hourly: a page view is not a write


class Viewer(msgspec.Struct, frozen=True):
    """The signed-in person looking at a page."""
    account_id: int
    email: str
    verified: bool
    is_admin: bool
    token_hash: bytes
    suspended: bool = False  # an operator stopped this account; it keeps its pages, not admin rights


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create(pool: asyncpg.Pool, account_id: int, proven_by: str | None) -> str | None:
    """A new session for the account, or None when `proven_by` (the password hash the person
    proved, or just set) is no longer the account's. A password check takes ~0.1 s: a reset or a
    change committed meanwhile ends every session there is, and one made after it from the old
    password would outlive it. The share lock waits for such a change to commit and then sees
    its hash. None for `proven_by`: no password was proven (an operator's tools, tests)."""
    token = secrets.token_urlsafe(32)
    # never for a closed account (identity.close_account): it ends every session and the
    # password with it, and the share lock waits for a close in flight too
    if proven_by is None:
        made = await pool.fetchval(
            "INSERT INTO web_sessions (token_hash, account_id, expires_at)"
            " SELECT $1, a.id, now() + make_interval(days => $3) FROM"
            " (SELECT id FROM accounts WHERE id = $2 AND closed_at IS NULL FOR SHARE) AS a RETURNING 1",
            token_hash(token), account_id, IDLE_DAYS)
        return token if made else None
    made = await pool.fetchval(
        "INSERT INTO web_sessions (token_hash, account_id, expires_at)"
        " SELECT $1, a.id, now() + make_interval(days => $3) FROM"
        " (SELECT id FROM accounts WHERE id = $2 AND password_hash = $4 AND closed_at IS NULL FOR SHARE) AS a"
        " RETURNING 1",
        token_hash(token), account_id, IDLE_DAYS, proven_by)
    return token if made else None


_LOOKUP = """
SELECT s.account_id, a.email, a.email_verified_at IS NOT NULL AS verified, a.is_admin,
       a.suspended_at IS NOT NULL AS suspended,
       s.seen_at < now() - make_interval(secs => $2) AS stale
  FROM web_sessions s JOIN accounts a ON a.id = s.account_id
 WHERE s.token_hash = $1 AND s.expires_at > now()
   AND s.created_at > now() - make_interval(days => $3)
   AND a.closed_at IS NULL
"""


async def lookup(pool: asyncpg.Pool, token: str | None, touch: bool = True) -> Viewer | None:
    """The session's viewer, or None; `touch`: a use of the session (a page), which keeps it
    from ending idle (`seen_at`, written at most hourly)."""
    if not token or len(token) > 128:
        return None
    digest = token_hash(token)
    row = await pool.fetchrow(_LOOKUP, digest, float(_TOUCH_SECONDS), MAX_DAYS)
    if row is None:
        return None
    if touch and row["stale"]:
        await pool.execute(
            "UPDATE web_sessions SET seen_at = now(), expires_at = now() + make_interval(days => $2)"
            " WHERE token_hash = $1", digest, IDLE_DAYS)
    return Viewer(account_id=row["account_id"], email=row["email"], verified=row["verified"],
                  is_admin=row["is_admin"], token_hash=digest, suspended=row["suspended"])


async def end(pool: asyncpg.Pool, viewer: Viewer) -> None:
    await pool.execute("DELETE FROM web_sessions WHERE token_hash = $1", viewer.token_hash)


async def end_all(conn: asyncpg.Connection | asyncpg.Pool, account_id: int) -> None:
    await conn.execute("DELETE FROM web_sessions WHERE account_id = $1", account_id)


async def end_others(conn: asyncpg.Connection | asyncpg.Pool, viewer: Viewer) -> int:
    """End every session of the viewer's account but the viewer's own: how many ended."""
    done = await conn.execute("DELETE FROM web_sessions WHERE account_id = $1 AND token_hash <> $2",
                              viewer.account_id, viewer.token_hash)
    return int(done.split()[-1])


async def others(pool: asyncpg.Pool, viewer: Viewer) -> int:
    """The account's live sessions besides the viewer's: other browsers still signed in."""
    return await pool.fetchval(
        "SELECT count(*) FROM web_sessions WHERE account_id = $1 AND token_hash <> $2"
        " AND expires_at > now() AND created_at > now() - make_interval(days => $3)",
        viewer.account_id, viewer.token_hash, MAX_DAYS)


def cookie(token: str, *, secure: bool) -> Cookie:
    return Cookie(key=COOKIE, value=token, path="/", httponly=True, secure=secure, samesite="lax",
                  max_age=MAX_DAYS * 86400)


def cleared(*, secure: bool) -> Cookie:
    return Cookie(key=COOKIE, value="", path="/", httponly=True, secure=secure, samesite="lax", max_age=0)
