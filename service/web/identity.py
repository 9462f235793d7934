"""Accounts on the web: sign up, log in, mailed one-time links (verify, reset, a new address),
change the address or the password, close the account, promote; and the expiry of accounts
whose address nobody confirmed.

Refusals carry a code the page translates; nothing here knows about HTTP.

A closed account keeps its row (the ledger, invoices and the audit name it) under an address
nobody can type or be mailed at (`closed_address`): every door here (log in, the links, a new
session, sessions.lookup) is shut to it by `closed_at`, not by that address alone.
"""
from __future__ import annotations

import hashlib
import logging
import re
import secrets
from email.utils import parseaddr

import asyncpg
import msgspec

from . import passwords, sessions, throttle
from .throttle import SignupLimit

log = logging.getLogger("codeplan.web")

# One plain addr-spec, dot-atom on both sides (RFC 5322 atext; no quotes, comments, commas,
# spaces or non-ASCII): anything else the mail library may read as another mailbox, or several
# ('x@ex.com,' and 'x@ex.com(2)' are delivered to x@ex.com), so one mailbox could hold many accounts.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
# a new address is confirmed by a link mailed to it, as a new account's is: the same lifetime
LINK_HOURS = {"verify": 48, "reset": 2, "email_change": 48}
CLOSED_DOMAIN = "closed.invalid"  # RFC 2606: never resolves, so never delivered
MAILS_PER_HOUR = 5  # per account and purpose: a form cannot be used to flood someone's inbox


class Refusal(Exception):
    def __init__(self, code: str, retry_after: int | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.retry_after = retry_after


class Closed(msgspec.Struct, frozen=True):
    """A closed account: where to send the notice (its address before it was erased)."""
    account_id: int
    email: str


class EmailChange(msgspec.Struct, frozen=True):
    """A change of address asked for: the link's token, for the mail to the new address."""
    account_id: int
    old_email: str
    new_email: str
    token: str


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
            or parseaddr(email) != ("", email)
            # the closed accounts' placeholders live there: nobody signs up or moves to one
            or email.rpartition("@")[2].lower().endswith(".invalid")):
        raise Refusal("bad_email")
    return email


def closed_address(account_id: int) -> str:
    """What a closed account's address becomes: unique by its id (accounts_email_key cannot
    collide with a person's, whose domains are never .invalid), and undeliverable."""
    return f"closed-{account_id}@{CLOSED_DOMAIN}"


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
  FROM (SELECT 1) AS one LEFT JOIN accounts a ON lower(a.email) = lower($1::text) AND a.closed_at IS NULL
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
        " WHERE lower(email) = lower($1) AND closed_at IS NULL", email.strip()[:320])
    return None if row is None else Account(id=row["id"], email=row["email"], verified=row["verified"])


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def issue_link(pool: asyncpg.Pool | asyncpg.Connection, account_id: int, purpose: str,
                     new_email: str | None = None) -> str | None:
    """A one-time token for a mailed link, or None when this account had enough mail this hour
    (or is closed). `new_email`: the address an 'email_change' link moves the account to."""
    token = secrets.token_urlsafe(32)
    inserted = await pool.fetchval(
        """INSERT INTO mail_tokens (token_hash, account_id, purpose, expires_at, new_email)
           SELECT $1, $2, $3, now() + make_interval(hours => $4), $6
            WHERE (SELECT count(*) FROM mail_tokens WHERE account_id = $2 AND purpose = $3
                      AND created_at > now() - interval '1 hour') < $5
              AND EXISTS (SELECT 1 FROM accounts WHERE id = $2 AND closed_at IS NULL)
           RETURNING 1""",
        _digest(token), account_id, purpose, LINK_HOURS[purpose], MAILS_PER_HOUR, new_email)
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
        "SELECT t.account_id FROM mail_tokens t JOIN accounts a ON a.id = t.account_id"
        " WHERE t.token_hash = $1 AND t.purpose = $2 AND t.used_at IS NULL AND t.expires_at > now()"
        " AND a.closed_at IS NULL", _digest(token), purpose)


# The lock order of everything done to an account: its links (`_lock_links`), the account, its
# sessions, its keys, its subscriptions (billing's order after the account). The links are taken
# in one order, by token_hash: a close spends them all, a reset or a change of address uses its
# own and spends the others, a password change spends the reset links; taken one as found and the
# others in scan order, two of these on one account deadlocked (one page a 500).

async def _lock_links(conn: asyncpg.Connection, account_id: int) -> list[bytes]:
    """Lock the account's open links, in token_hash order (as `_expire_one` locks them all):
    first in any transaction that touches more than one of them. Returns them; a transaction
    spends only these (`_spend`): a link issued since, locked by its own user first, would be
    taken out of order. Used and expired ones are left alone (nothing writes them again but the
    housekeeping's delete)."""
    return [r["token_hash"] for r in await conn.fetch(
        "SELECT token_hash FROM mail_tokens WHERE account_id = $1 AND used_at IS NULL AND expires_at > now()"
        " ORDER BY token_hash FOR UPDATE", account_id)]


async def _spend(conn: asyncpg.Connection, locked: list[bytes], purpose: str | None = None) -> None:
    """The links `_lock_links` locked (of `purpose`, or all) stop working."""
    await conn.execute("UPDATE mail_tokens SET used_at = now() WHERE token_hash = ANY($1::bytea[])"
                       " AND used_at IS NULL AND ($2::text IS NULL OR purpose = $2)", locked, purpose)


async def _link_owner(conn: asyncpg.Connection, token: str, purpose: str) -> int | None:
    """The account a link names, read without a lock: a transaction that starts from a link
    locks the account's links (`_lock_links`) with it, and then uses the link (`_use_link`,
    which checks it again: one used or expired meanwhile is refused there)."""
    if not token or len(token) > 128:
        return None
    return await conn.fetchval("SELECT account_id FROM mail_tokens WHERE token_hash = $1 AND purpose = $2",
                               _digest(token), purpose)


async def _use_link(conn: asyncpg.Connection, token: str, purpose: str) -> int | None:
    if not token or len(token) > 128:
        return None
    # a closed account's links were all spent as it closed (links first, as here: one waits for
    # the other); the join keeps it shut should one be written by hand since
    return await conn.fetchval(
        "UPDATE mail_tokens t SET used_at = now() FROM accounts a WHERE t.token_hash = $1 AND t.purpose = $2"
        " AND t.used_at IS NULL AND t.expires_at > now() AND a.id = t.account_id AND a.closed_at IS NULL"
        " RETURNING t.account_id", _digest(token), purpose)


async def verify_link_email(pool: asyncpg.Pool, token: str) -> str | None:
    """The address a still-valid verify link would confirm, without using it (the page a GET of
    the link shows: confirming takes a POST, so a mail scanner opening the link confirms nothing)."""
    if not token or len(token) > 128:
        return None
    return await pool.fetchval(
        "SELECT a.email FROM mail_tokens t JOIN accounts a ON a.id = t.account_id"
        " WHERE t.token_hash = $1 AND t.purpose = 'verify' AND t.used_at IS NULL AND t.expires_at > now()"
        " AND a.closed_at IS NULL", _digest(token))


async def verify(pool: asyncpg.Pool, token: str) -> int | None:
    """Use a verify link up and confirm its account's address (the POST of the link's page)."""
    async with pool.acquire() as conn, conn.transaction():
        # one link, then the account (the order above): it spends no other, so it locks no other
        account_id = await _use_link(conn, token, "verify")
        if account_id is not None:
            await conn.execute("UPDATE accounts SET email_verified_at = coalesce(email_verified_at, now())"
                               " WHERE id = $1", account_id)
        return account_id


async def _spend_reset_links(conn: asyncpg.Connection, account_id: int) -> None:
    """The account's unused reset links stop working: its password was just set. The links
    first, in their order (`_lock_links`)."""
    await _spend(conn, await _lock_links(conn, account_id), "reset")


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
        # the account's links, in their order, before this one is used (the order above)
        owner = await _link_owner(conn, token, "reset")
        locked = await _lock_links(conn, owner) if owner is not None else []
        account_id = await _use_link(conn, token, "reset")
        if account_id is None:  # used (or expired) while the password was hashed
            raise Refusal("bad_link")
        await _spend(conn, locked, "reset")
        await conn.execute(
            "UPDATE accounts SET password_hash = $2, email_verified_at = coalesce(email_verified_at, now())"
            " WHERE id = $1", account_id, hashed)
        await sessions.end_all(conn, account_id)
        # the failed logins that locked the account are forgotten: the new password works at once
        await throttle.forget_account(conn, account_id)
        row = await conn.fetchrow("SELECT email, email_verified_at IS NOT NULL AS verified FROM accounts"
                                  " WHERE id = $1", account_id)
    return Account(id=account_id, email=row["email"], verified=row["verified"], proven_by=hashed)


async def _proven(pool: asyncpg.Pool, viewer: sessions.Viewer, current: str, address: str) -> str:
    """The account's password hash, once `current` proved to be its password: checked as a
    login is (counted first under the same throttle, taken back when right), so a session left
    open, or a stolen cookie, is no faster way to guess it than the login form."""
    key = throttle.login_key(viewer.account_id, "")
    wait = await throttle.take_login(pool, key, address)
    if wait is not None:
        raise Refusal("throttled", retry_after=wait)
    stored = await pool.fetchval("SELECT password_hash FROM accounts WHERE id = $1", viewer.account_id)
    if not await passwords.verify_async(current[:passwords.MAX_LENGTH], stored):
        raise Refusal("wrong_password")
    await throttle.succeeded(pool, key)
    return stored


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
    stored = await _proven(pool, viewer, current, address)
    hashed = await passwords.hash_async(new)
    async with pool.acquire() as conn, conn.transaction():
        # the links first, in their order, then the account, then the sessions (the order above:
        # a reset takes them so; the other way round the two deadlocked)
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
                                     " AND closed_at IS NULL FOR NO KEY UPDATE", email.strip())
        account = await conn.fetchval("UPDATE accounts SET is_admin = true WHERE lower(email) = lower($1)"
                                      " AND closed_at IS NULL RETURNING id", email.strip())
        if account is not None:
            await audit.record(conn, actor, "user.promote", f"account:{account}",
                               {"is_admin": before}, {"is_admin": True})
        return account


# ---- a new address ----------------------------------------------------------------------

async def change_email(pool: asyncpg.Pool, viewer: sessions.Viewer, new: str, current: str, address: str,
                       limit: SignupLimit | None = None) -> EmailChange:
    """Ask to move the account to `new`: a link mailed there confirms it (`confirm_email_change`);
    nothing changes until then. The password proves the owner is at the keyboard (`_proven`).

    Whether another account has `new` is said (as the sign-up says it), at the sign-up's rate:
    each look-up counts as a sign-up from the client's address (`limit`: CODEPLAN_SIGNUP_LIMIT per
    CODEPLAN_SIGNUP_WINDOW, in the same count), so this form is no faster way than the sign-up
    to learn who has an account. Counted after the password: a stolen cookie alone learns nothing.
    Links per account and hour are MAILS_PER_HOUR, as for the others: the form cannot be used to
    mail strangers."""
    new = normal_email(new)
    if new.lower() == viewer.email.lower():
        raise Refusal("same_email")
    await _proven(pool, viewer, current, address)
    if limit is not None and limit.limit > 0:
        wait = await throttle.take_signup(pool, limit)
        if wait is not None:
            raise Refusal("signup_throttled", retry_after=wait)
    if await pool.fetchval("SELECT 1 FROM accounts WHERE lower(email) = lower($1)", new):
        raise Refusal("email_taken")
    token = await issue_link(pool, viewer.account_id, "email_change", new)
    if token is None:
        raise Refusal("mail_limit")
    return EmailChange(account_id=viewer.account_id, old_email=viewer.email, new_email=new, token=token)


async def email_change_target(pool: asyncpg.Pool, token: str) -> str | None:
    """The address a still-valid change link would move its account to, without using it (the
    page a GET of the link shows: a mail scanner opening it changes nothing)."""
    if not token or len(token) > 128:
        return None
    return await pool.fetchval(
        "SELECT t.new_email FROM mail_tokens t JOIN accounts a ON a.id = t.account_id"
        " WHERE t.token_hash = $1 AND t.purpose = 'email_change' AND t.used_at IS NULL"
        " AND t.expires_at > now() AND a.closed_at IS NULL", _digest(token))


async def confirm_email_change(pool: asyncpg.Pool, token: str) -> int:
    """Use a change link up (the POST of its page): the account takes the link's address, now
    confirmed, if no account took it since (else Refusal 'email_taken_since', and nothing moves:
    the link stays unused). Every other open link of the account is spent: reset and verify
    links went to the old address, other change links to other addresses. Returns the account.

    The lock order of a reset and a close: the account's links (all, in their order), then the
    account."""
    if not token or len(token) > 128:
        raise Refusal("bad_link")
    async with pool.acquire() as conn, conn.transaction():
        owner = await _link_owner(conn, token, "email_change")
        if owner is None:
            raise Refusal("bad_link")
        locked = await _lock_links(conn, owner)
        # checked again under the locks: used (or expired) meanwhile, it is refused
        link = await conn.fetchrow(
            "UPDATE mail_tokens t SET used_at = now() FROM accounts a WHERE t.token_hash = $1"
            " AND t.purpose = 'email_change' AND t.used_at IS NULL AND t.expires_at > now()"
            " AND a.id = t.account_id AND a.closed_at IS NULL RETURNING t.account_id, t.new_email", _digest(token))
        if link is None:
            raise Refusal("bad_link")
        await _spend(conn, locked)
        try:
            # the case-blind unique index decides, also against a sign-up committed a moment ago
            # (the transaction, and with it the link's use, is rolled back)
            moved = await conn.fetchval(
                "UPDATE accounts SET email = $2, email_verified_at = now() WHERE id = $1 AND closed_at IS NULL"
                " RETURNING id", link["account_id"], link["new_email"])
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "accounts_email_key":
                raise
            raise Refusal("email_taken_since") from None
        if moved is None:
            raise Refusal("bad_link")
        return moved


async def _spend_links(conn: asyncpg.Connection, account_id: int) -> None:
    """Every unused link of the account stops working (whatever its purpose); locked in their
    order first (`_lock_links`)."""
    await _spend(conn, await _lock_links(conn, account_id))


# ---- closing ----------------------------------------------------------------------------

async def stripe_bills(conn: asyncpg.Connection | asyncpg.Pool, account_id: int) -> bool:
    """Whether a live subscription of the account is paid through Stripe: Stripe keeps charging
    it until it is canceled there (billing owns that), so the account cannot be closed before."""
    return bool(await conn.fetchval(
        "SELECT 1 FROM subscriptions WHERE account_id = $1 AND status <> 'canceled'"
        " AND stripe_subscription_id IS NOT NULL", account_id))


async def close_account(pool: asyncpg.Pool, viewer: sessions.Viewer, current: str, confirm: str,
                        address: str) -> Closed:
    """Close the viewer's account for good, in one transaction: every link spent, every session
    ended, every API key revoked (bridges look keys up by `revoked_at IS NULL`; a cached one
    lasts CODEPLAN_AUTH_CACHE_TTL at most, and its admission then finds the plan ended), a live
    plan not billed by Stripe ended as billing ends one (status 'canceled', ended_at: requests
    in flight settle as usual), the failed logins forgotten, and the address freed (replaced by
    `closed_address`). The row stays: the ledger, invoices and the audit name it.

    Refused while Stripe bills the account ('stripe_live'); `confirm` must be the account's
    address, typed ('confirm_mismatch'); the password is proven as for a change (`_proven`).
    Returns where to send the notice: the address, read under the lock before it is erased."""
    if confirm.strip().lower() != viewer.email.lower():
        raise Refusal("confirm_mismatch")
    if await stripe_bills(pool, viewer.account_id):  # said before the password is asked for
        raise Refusal("stripe_live")
    stored = await _proven(pool, viewer, current, address)
    account_id = viewer.account_id
    async with pool.acquire() as conn, conn.transaction():
        # the lock order of a reset, a change of address and a password change: the links (in
        # their order), the account, the sessions; then the keys, and the subscriptions
        # (billing's order after the account)
        await _spend_links(conn, account_id)
        row = await conn.fetchrow("SELECT email, password_hash, closed_at FROM accounts WHERE id = $1"
                                  " FOR NO KEY UPDATE", account_id)
        if row is None or row["closed_at"] is not None or row["password_hash"] != stored:
            raise Refusal("wrong_password")  # a reset or a change came first: this proof is stale
        ended = await conn.fetch("DELETE FROM web_sessions WHERE account_id = $1 RETURNING token_hash", account_id)
        if viewer.token_hash not in {r["token_hash"] for r in ended}:
            raise Refusal("wrong_password")  # this session was ended meanwhile (a reset link used)
        # the same column the Keys page and `codeplan keys revoke` write
        await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE account_id = $1 AND revoked_at IS NULL",
                           account_id)
        live = await conn.fetch("SELECT id, stripe_subscription_id FROM subscriptions WHERE account_id = $1"
                                " AND status <> 'canceled' FOR NO KEY UPDATE", account_id)
        if any(s["stripe_subscription_id"] is not None for s in live):
            raise Refusal("stripe_live")  # bought while the password was checked
        for sub in live:
            # as billing ends one (billing_apply_subscription): admission refuses the next
            # request; those in flight settle against their windows as usual
            await conn.execute("UPDATE subscriptions SET status = 'canceled', ended_at = now() WHERE id = $1",
                               sub["id"])
            # the live figures' sockets read it again when this commits (as after a plan change)
            await conn.execute("SELECT pg_notify('codeplan_usage', $1)", str(sub["id"]))
        await throttle.forget_account(conn, account_id)
        await conn.execute(
            "UPDATE accounts SET closed_at = now(), email = $2, password_hash = NULL WHERE id = $1",
            account_id, closed_address(account_id))
    return Closed(account_id=account_id, email=row["email"])


# ---- addresses never confirmed ------------------------------------------------------------

# An account made by the web's sign-up (it has a password: an operator's has none until its
# owner sets one) whose address nobody confirmed for `$1` days, holding nothing that must be
# kept: no usage (ledger rows, daily figures, windows), nothing billed or paid (a Stripe
# customer, subscription, invoice, top-up, or a duplicate's refund), no admin rights, not
# suspended, no audit row naming it. Its subscription given by the sign-up (CODEPLAN_SIGNUP_PLAN,
# never used) and its keys never used for a request go with it. Every table with an account_id
# (or naming one: admin_audit.target, login_failures.email) is here or deleted with it.
_EXPIRABLE = """
SELECT a.id FROM accounts a
 WHERE a.email_verified_at IS NULL AND a.closed_at IS NULL
   AND a.created_at < now() - make_interval(days => $1)
   AND a.password_hash IS NOT NULL AND NOT a.is_admin AND a.suspended_at IS NULL
   AND a.stripe_customer_id IS NULL
   AND NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.account_id = a.id
                     AND (s.stripe_subscription_id IS NOT NULL
                          OR EXISTS (SELECT 1 FROM usage_ledger l WHERE l.subscription_id = s.id)
                          OR EXISTS (SELECT 1 FROM usage_daily d WHERE d.subscription_id = s.id)
                          OR EXISTS (SELECT 1 FROM quota_windows q WHERE q.subscription_id = s.id)))
   AND NOT EXISTS (SELECT 1 FROM stripe_subscriptions m WHERE m.account_id = a.id)
   AND NOT EXISTS (SELECT 1 FROM billing_invoices i WHERE i.account_id = a.id)
   AND NOT EXISTS (SELECT 1 FROM topups t WHERE t.account_id = a.id)
   AND NOT EXISTS (SELECT 1 FROM duplicate_subscriptions d WHERE d.account_id = a.id)
   AND NOT EXISTS (SELECT 1 FROM ended_subscription_invoices e WHERE e.account_id = a.id)
   AND NOT EXISTS (SELECT 1 FROM admin_audit x WHERE x.target = 'account:' || a.id)
"""


class _Kept(Exception):
    """The account gained something to keep while its locks were taken: roll back, leave it."""


async def expire_unverified(pool: asyncpg.Pool, days: int, batch: int = 100, max_batches: int = 10) -> int:
    """Delete the accounts `_EXPIRABLE` finds, with their sessions, links, keys, sign-up
    subscription and failed logins; how many. A stranger's typo, or an address signed up to hold
    it, is free again. Batched (`batch` accounts per look-up, each deleted in a transaction of
    its own), idempotent, and safe with several processes at once: an account another process
    is deleting is skipped (a try of an advisory lock), and each is checked again under its
    locks, so one that gained a use or a payment meanwhile stays."""
    if days <= 0:
        return 0
    deleted = 0
    async with pool.acquire() as conn:
        for _ in range(max_batches):
            found = [r["id"] for r in await conn.fetch(_EXPIRABLE + " ORDER BY a.created_at LIMIT $2", days, batch)]
            done_here = 0
            for account_id in found:
                try:
                    async with conn.transaction():
                        done_here += await _expire_one(conn, account_id, days)
                except _Kept:
                    pass
                except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
                    # in use this very moment (a reset, a sign-in): the next round sees it again
                    log.info("unconfirmed account not expired now: in use", extra={"account": account_id})
            deleted += done_here
            if len(found) < batch or done_here == 0:
                break
    return deleted


async def _expire_one(conn: asyncpg.Connection, account_id: int, days: int) -> int:
    await conn.execute("SET LOCAL lock_timeout = '2s'")
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                               f"codeplan:expire-unverified:{account_id}"):
        return 0  # another process is on it
    # the order of a reset, a change and a close: the links (all of them, used ones too: they go
    # with the account; in `_lock_links`' order), the account, the sessions; then the keys,
    # the subscriptions and their admission mutexes (the admin's and billing's order)
    await conn.execute("SELECT 1 FROM mail_tokens WHERE account_id = $1 ORDER BY token_hash FOR UPDATE", account_id)
    if await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id) is None:
        return 0  # deleted by another process since it was found
    await conn.execute("SELECT 1 FROM web_sessions WHERE account_id = $1 ORDER BY token_hash FOR UPDATE", account_id)
    await conn.execute("SELECT 1 FROM api_keys WHERE account_id = $1 ORDER BY id FOR UPDATE", account_id)
    subscriptions = [r["id"] for r in await conn.fetch(
        "SELECT id FROM subscriptions WHERE account_id = $1 ORDER BY id FOR UPDATE", account_id)]
    if subscriptions:
        # the admission mutexes, made if missing: an admission on its way (a key cached a moment
        # more) waits here, and then finds no subscription; none can add a ledger row under us
        await conn.execute("INSERT INTO subscription_flights (subscription_id) SELECT x FROM unnest($1::bigint[]) x"
                           " ORDER BY x ON CONFLICT DO NOTHING", subscriptions)
        await conn.execute("SELECT 1 FROM subscription_flights WHERE subscription_id = ANY($1)"
                           " ORDER BY subscription_id FOR UPDATE", subscriptions)
    # again, under the locks, with all that committed before them
    if not await conn.fetchval(_EXPIRABLE + " AND a.id = $2", days, account_id):
        raise _Kept
    await conn.execute("DELETE FROM subscription_flights WHERE subscription_id = ANY($1)", subscriptions)
    await conn.execute("DELETE FROM subscriptions WHERE account_id = $1", account_id)
    await conn.execute("DELETE FROM api_keys WHERE account_id = $1", account_id)
    await throttle.forget_account(conn, account_id)
    # its sessions and links go with it (ON DELETE CASCADE)
    await conn.execute("DELETE FROM accounts WHERE id = $1", account_id)
    log.info("unconfirmed account expired", extra={"account": account_id})
    return 1


async def housekeeping(pool: asyncpg.Pool, signup_window: float = 0, unverified_days: int = 0) -> None:
    """Forget what can no longer matter: ended sessions, old failures, spent links, sign-ups
    older than a day and than the sign-up window; and, with `unverified_days` (mail on: an
    address can be confirmed), the accounts whose address nobody confirmed in that many days
    and that hold nothing (`expire_unverified`)."""
    await pool.execute("DELETE FROM signup_attempts WHERE at < now() - make_interval(secs => $1)",
                       max(86400.0, float(signup_window)))
    await pool.execute("DELETE FROM web_sessions WHERE expires_at < now()")
    await pool.execute("DELETE FROM login_failures WHERE failed_at < now() - interval '1 day'")
    await pool.execute("DELETE FROM mail_tokens WHERE expires_at < now() - interval '1 day'")
    if unverified_days > 0:
        await expire_unverified(pool, unverified_days)


async def verified_by_link(pool: asyncpg.Pool, token: str) -> int | None:
    """The account of a verify link used already (a mail scanner or a link preview opened it
    first), while the link has not expired and the account's address is confirmed: opening it
    again is no error. Only verify links: every other link stays single-use."""
    if not token or len(token) > 128:
        return None
    return await pool.fetchval(
        "SELECT t.account_id FROM mail_tokens t JOIN accounts a ON a.id = t.account_id"
        " WHERE t.token_hash = $1 AND t.purpose = 'verify' AND t.used_at IS NOT NULL"
        " AND t.expires_at > now() AND a.email_verified_at IS NOT NULL AND a.closed_at IS NULL", _digest(token))
