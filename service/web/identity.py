"""Accounts on the web: sign up, log in, mailed one-time links (verify, reset), promote.

Refusals carry a code the page translates; nothing here knows about HTTP.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from email.utils import parseaddr

import asyncpg
import msgspec

from . import passwords, sessions, throttle
from .throttle import SignupLimit

# One plain addr-spec, dot-atom on both sides (RFC 5322 atext; no quotes, comments, commas,
# spaces or non-ASCII): anything else the mail library may read as another mailbox, or several
# ('x@ex.com,' and 'x@ex.com(2)' are delivered to x@ex.com), so one mailbox could hold many accounts.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
LINK_HOURS = {"verify": 48, "reset": 2}
MAILS_PER_HOUR = 5  # per account and purpose: a form cannot be used to flood someone's inbox


class Refusal(Exception):
    def __init__(self, code: str, retry_after: int | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.retry_after = retry_after


class Account(msgspec.Struct, frozen=True):
    id: int
    email: str
    verified: bool
    # the password hash this person proved (a login) or set (a sign-up, a reset): a session is
    # made only while it is still the account's (sessions.create)
    proven_by: str | None = None


def normal_email(email: str) -> str:
    """The address a new account is made with; existing accounts keep theirs (they log in and
    reset by a case-blind match, which checks no shape)."""
    email = email.strip()
    local = email.partition("@")[0]
    if (len(email) > 254 or len(local) > 64 or not _EMAIL.fullmatch(email)
            # and what the mail library takes from it is this one address, unchanged
            or parseaddr(email) != ("", email)):
        raise Refusal("bad_email")
    return email


def signup_plan_problem(plan: str, plans: list) -> str | None:
    """Why CODEPLAN_SIGNUP_PLAN cannot be given to new accounts (rows: id, retired_at), or None."""
    on_sale = ", ".join(r["id"] for r in plans if r["retired_at"] is None)
    found = next((r for r in plans if r["id"] == plan), None)
    if found is None:
        return f"CODEPLAN_SIGNUP_PLAN: no plan {plan!r}; plans are: {on_sale}"
    if found["retired_at"] is not None:
        return f"CODEPLAN_SIGNUP_PLAN: plan {plan!r} is retired and takes no new subscriptions; plans are: {on_sale}"
    return None


async def sign_up(pool: asyncpg.Pool, email: str, password: str, signup_plan: str,
                  limit: SignupLimit | None = None) -> Account:
    email = normal_email(email)
    reason = passwords.weakness(password)
    if reason:
        raise Refusal(reason)
    if limit is not None and limit.limit > 0:
        # before the hash: a refused sign-up costs one query, not 0.1 s of CPU and 32 MiB
        wait = await throttle.take_signup(pool, limit)
        if wait is not None:
            raise Refusal("signup_throttled", retry_after=wait)
    hashed = await passwords.hash_async(password)
    async with pool.acquire() as conn, conn.transaction():
        try:
            account_id = await conn.fetchval(
                "INSERT INTO accounts (email, password_hash) VALUES ($1, $2) RETURNING id", email, hashed)
        except asyncpg.UniqueViolationError:
            raise Refusal("exists") from None
        if signup_plan:
            # a plan retired since start-up is given to nobody new: the account starts without one
            await conn.execute(
                "INSERT INTO subscriptions (account_id, plan_id, status)"
                " SELECT $1, id, 'active' FROM plans WHERE id = $2 AND retired_at IS NULL",
                account_id, signup_plan)
    return Account(id=account_id, email=email, verified=False, proven_by=hashed)


# The typed address as PostgreSQL folds it comes back with the account (if any): the throttle's
# key uses this one folding, the one that decides which account a login is for.
_LOGIN_LOOKUP = """
SELECT a.id, a.email, a.password_hash, a.email_verified_at IS NOT NULL AS verified, lower($1::text) AS lowered
  FROM (SELECT 1) AS one LEFT JOIN accounts a ON lower(a.email) = lower($1::text)
"""


async def log_in(pool: asyncpg.Pool, email: str, password: str, address: str) -> Account:
    row = await pool.fetchrow(_LOGIN_LOOKUP, email.strip()[:320])
    key = throttle.login_key(row["id"], row["lowered"])
    # the attempt is counted before the (costly) check and taken back if the password is right
    wait = await throttle.take_login(pool, key, address)
    if wait is not None:
        raise Refusal("throttled", retry_after=wait)
    ok = await passwords.verify_async(password[:passwords.MAX_LENGTH], row["password_hash"])
    if not ok or row["id"] is None:
        raise Refusal("bad_credentials")
    await throttle.succeeded(pool, key)
    proven = row["password_hash"]
    if passwords.needs_rehash(proven):
        stronger = await passwords.hash_async(password)
        # only over the hash checked: a reset or a change meanwhile keeps its own
        if await pool.fetchval("UPDATE accounts SET password_hash = $2 WHERE id = $1 AND password_hash = $3"
                               " RETURNING 1", row["id"], stronger, proven):
            proven = stronger
    return Account(id=row["id"], email=row["email"], verified=row["verified"], proven_by=proven)


async def find(pool: asyncpg.Pool, email: str) -> Account | None:
    row = await pool.fetchrow(
        "SELECT id, email, email_verified_at IS NOT NULL AS verified FROM accounts"
        " WHERE lower(email) = lower($1)", email.strip()[:320])
    return None if row is None else Account(id=row["id"], email=row["email"], verified=row["verified"])


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def issue_link(pool: asyncpg.Pool, account_id: int, purpose: str) -> str | None:
    """A one-time token for a mailed link, or None when this account had enough mail this hour."""
    token = secrets.token_urlsafe(32)
    inserted = await pool.fetchval(
        """INSERT INTO mail_tokens (token_hash, account_id, purpose, expires_at)
           SELECT $1, $2, $3, now() + make_interval(hours => $4)
            WHERE (SELECT count(*) FROM mail_tokens WHERE account_id = $2 AND purpose = $3
                      AND created_at > now() - interval '1 hour') < $5
           RETURNING 1""",
        _digest(token), account_id, purpose, LINK_HOURS[purpose], MAILS_PER_HOUR)
    return token if inserted else None


async def withdraw_link(pool: asyncpg.Pool, token: str) -> None:
    """Take back a link whose mail was not sent (the SMTP server away, the mailer full): nobody
    can hold it, and it must not count against the account's MAILS_PER_HOUR, or an outage would
    leave the account without a link for an hour after it ends."""
    await pool.execute("DELETE FROM mail_tokens WHERE token_hash = $1 AND used_at IS NULL", _digest(token))


async def link_account(pool: asyncpg.Pool, token: str, purpose: str) -> int | None:
    """The account a still-valid link is for, without using it up (the reset form's GET)."""
    if not token or len(token) > 128:
        return None
    return await pool.fetchval(
        "SELECT account_id FROM mail_tokens WHERE token_hash = $1 AND purpose = $2"
        " AND used_at IS NULL AND expires_at > now()", _digest(token), purpose)


async def _use_link(conn: asyncpg.Connection, token: str, purpose: str) -> int | None:
    if not token or len(token) > 128:
        return None
    return await conn.fetchval(
        "UPDATE mail_tokens SET used_at = now() WHERE token_hash = $1 AND purpose = $2"
        " AND used_at IS NULL AND expires_at > now() RETURNING account_id", _digest(token), purpose)


async def verify_link_email(pool: asyncpg.Pool, token: str) -> str | None:
    """The address a still-valid verify link would confirm, without using it (the page a GET of
    the link shows: confirming takes a POST, so a mail scanner opening the link confirms nothing)."""
    if not token or len(token) > 128:
        return None
    return await pool.fetchval(
        "SELECT a.email FROM mail_tokens t JOIN accounts a ON a.id = t.account_id"
        " WHERE t.token_hash = $1 AND t.purpose = 'verify' AND t.used_at IS NULL AND t.expires_at > now()",
        _digest(token))


async def verify(pool: asyncpg.Pool, token: str) -> int | None:
    """Use a verify link up and confirm its account's address (the POST of the link's page)."""
    async with pool.acquire() as conn, conn.transaction():
        account_id = await _use_link(conn, token, "verify")
        if account_id is not None:
            await conn.execute("UPDATE accounts SET email_verified_at = coalesce(email_verified_at, now())"
                               " WHERE id = $1", account_id)
        return account_id


async def _spend_reset_links(conn: asyncpg.Connection, account_id: int) -> None:
    """The account's unused reset links stop working: its password was just set."""
    await conn.execute("UPDATE mail_tokens SET used_at = now() WHERE account_id = $1 AND purpose = 'reset'"
                       " AND used_at IS NULL", account_id)


async def reset_password(pool: asyncpg.Pool, token: str, password: str) -> Account:
    """Set a new password through a reset link. The link proves the address, so it also
    verifies it; every other session of the account ends, and its failed logins are forgotten
    (a lockout must not refuse the new password for its 15 minutes)."""
    reason = passwords.weakness(password)
    if reason:
        raise Refusal(reason)
    # the token first (one indexed query): a made-up one must not cost a hash (~0.1 s of CPU and
    # 32 MiB on the two hashing threads logins share); it is used up only below, with the change
    if await link_account(pool, token, "reset") is None:
        raise Refusal("bad_link")
    hashed = await passwords.hash_async(password)
    async with pool.acquire() as conn, conn.transaction():
        account_id = await _use_link(conn, token, "reset")
        if account_id is None:  # used (or expired) while the password was hashed
            raise Refusal("bad_link")
        await conn.execute(
            "UPDATE accounts SET password_hash = $2, email_verified_at = coalesce(email_verified_at, now())"
            " WHERE id = $1", account_id, hashed)
        await sessions.end_all(conn, account_id)
        await _spend_reset_links(conn, account_id)
        # the failed logins that locked the account are forgotten: the new password works at once
        await throttle.forget_account(conn, account_id)
        row = await conn.fetchrow("SELECT email, email_verified_at IS NOT NULL AS verified FROM accounts"
                                  " WHERE id = $1", account_id)
    return Account(id=account_id, email=row["email"], verified=row["verified"], proven_by=hashed)


async def change_password(pool: asyncpg.Pool, viewer: sessions.Viewer, current: str, new: str,
                          address: str) -> None:
    """A signed-in person's new password. The current one proves the owner is at the keyboard (a
    session left open, or a stolen cookie, is not enough to take the account over), and is
    checked as a login is: counted first under the same throttle, so a session cannot be used to
    guess it faster than the login form allows. Every other session of the account ends and its
    unused reset links are spent (whoever had them no longer gets in); this session stays."""
    reason = passwords.weakness(new)
    if reason:
        raise Refusal(reason)
    key = throttle.login_key(viewer.account_id, "")
    wait = await throttle.take_login(pool, key, address)
    if wait is not None:
        raise Refusal("throttled", retry_after=wait)
    stored = await pool.fetchval("SELECT password_hash FROM accounts WHERE id = $1", viewer.account_id)
    if not await passwords.verify_async(current[:passwords.MAX_LENGTH], stored):
        raise Refusal("wrong_password")
    await throttle.succeeded(pool, key)
    hashed = await passwords.hash_async(new)
    async with pool.acquire() as conn, conn.transaction():
        # the reset links first: a reset takes its link, then the account, then the sessions, and
        # this takes them in that order too (the other way round the two deadlocked)
        await _spend_reset_links(conn, viewer.account_id)
        # only over the hash that was checked, and only while this session lives: a reset link
        # used meanwhile (it ends every session) wins, and this change is refused, not applied
        changed = await conn.fetchval(
            "UPDATE accounts SET password_hash = $2 WHERE id = $1 AND password_hash = $3"
            " AND EXISTS (SELECT 1 FROM web_sessions WHERE token_hash = $4 AND account_id = $1)"
            " RETURNING id", viewer.account_id, hashed, stored, viewer.token_hash)
        if changed is None:
            raise Refusal("wrong_password")
        await sessions.end_others(conn, viewer)


async def promote(conn: asyncpg.Connection, email: str, actor: str = "cli") -> int | None:
    """Make the account an admin (`codeplan users promote`), with its admin_audit row in the same
    transaction: admin rights are granted nowhere without a trace."""
    from ..admin import audit  # the audit's writer; loaded only by the command that promotes

    async with conn.transaction():
        before = await conn.fetchval("SELECT is_admin FROM accounts WHERE lower(email) = lower($1)"
                                     " FOR NO KEY UPDATE", email.strip())
        account = await conn.fetchval("UPDATE accounts SET is_admin = true WHERE lower(email) = lower($1)"
                                      " RETURNING id", email.strip())
        if account is not None:
            await audit.record(conn, actor, "user.promote", f"account:{account}",
                               {"is_admin": before}, {"is_admin": True})
        return account


async def housekeeping(pool: asyncpg.Pool, signup_window: float = 0) -> None:
    """Forget what can no longer matter: ended sessions, old failures, spent links, sign-ups
    older than a day and than the sign-up window."""
    await pool.execute("DELETE FROM signup_attempts WHERE at < now() - make_interval(secs => $1)",
                       max(86400.0, float(signup_window)))
    await pool.execute("DELETE FROM web_sessions WHERE expires_at < now()")
    await pool.execute("DELETE FROM login_failures WHERE failed_at < now() - interval '1 day'")
    await pool.execute("DELETE FROM mail_tokens WHERE expires_at < now() - interval '1 day'")


async def verified_by_link(pool: asyncpg.Pool, token: str) -> int | None:
    """The account of a verify link used already (a mail scanner or a link preview opened it
    first), while the link has not expired and the account's address is confirmed: opening it
    again is no error. Only verify links: every other link stays single-use."""
    if not token or len(token) > 128:
        return None
    return await pool.fetchval(
        "SELECT t.account_id FROM mail_tokens t JOIN accounts a ON a.id = t.account_id"
        " WHERE t.token_hash = $1 AND t.purpose = 'verify' AND t.used_at IS NOT NULL"
        " AND t.expires_at > now() AND a.email_verified_at IS NOT NULL", _digest(token))
