"""Accounts, their subscription and their keys; authentication of a key."""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import asyncpg
import msgspec

from bridge.ports import Principal

from . import keys


class AccountError(Exception):
    """A request about accounts that cannot be carried out, with a message for the operator."""


class NewKey(msgspec.Struct, frozen=True):
    account_id: int
    key: str
    prefix: str


def account_email(email: str) -> str:
    """The address an operator typed (`codeplan users create`), as the web's sign-up takes one:
    trimmed, one plain ASCII addr-spec; else an AccountError saying so. Stored unnormalised (a
    pasted trailing space, a non-ASCII address), it would be an account its owner could never log
    in to or reset, and the web's sign-up would make a second one for the same mailbox."""
    from .web.identity import Refusal, normal_email  # the web's one rule for a new account's address

    try:
        return normal_email(email)
    except Refusal:
        raise AccountError(f"{email.strip()!r} is not one plain ASCII email address such as name@example.com"
                           " (no spaces, quotes, commas or non-ASCII letters)") from None


async def create_user(conn: asyncpg.Connection, email: str, plan: str) -> NewKey:
    email = account_email(email)
    async with conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM plans WHERE id = $1 AND retired_at IS NULL", plan):
            names = ", ".join(r["id"] for r in await conn.fetch(
                "SELECT id FROM plans WHERE retired_at IS NULL ORDER BY window_tokens"))
            raise AccountError(f"unknown plan {plan!r}; plans are: {names}")
        try:
            account_id = await conn.fetchval(
                "INSERT INTO accounts (email) VALUES ($1) RETURNING id", email)
        except asyncpg.UniqueViolationError:
            raise AccountError(f"an account with email {email!r} exists already") from None
        except asyncpg.CheckViolationError:
            raise AccountError(f"{email!r} is not an email address") from None
        await conn.execute(
            "INSERT INTO subscriptions (account_id, plan_id, status) VALUES ($1, $2, 'active')",
            account_id, plan)
        return await _insert_key(conn, account_id)


async def create_key(conn: asyncpg.Connection, email: str, name: str = "") -> NewKey:
    email = email.strip()
    # a closed account's placeholder address names it still: it gets no key
    account_id = await conn.fetchval(
        "SELECT id FROM accounts WHERE lower(email) = lower($1) AND closed_at IS NULL", email)
    if account_id is None:
        raise AccountError(f"no account with email {email!r}")
    return await _insert_key(conn, account_id, name)


async def revoke_key(conn: asyncpg.Connection, prefix: str, actor: str = "cli") -> int:
    """Revoke the key shown as `prefix` (`codeplan keys revoke`), with its admin_audit row in the
    same transaction; returns its account. Bridges stop accepting it within their authentication
    cache's lifetime (CODEPLAN_AUTH_CACHE_TTL)."""
    from .admin import audit  # the audit's writer; loaded only by the command that revokes

    async with conn.transaction():
        rows = await conn.fetch("SELECT id, account_id, revoked_at FROM api_keys WHERE prefix = $1 FOR UPDATE",
                                prefix)
        if not rows:
            raise AccountError(f"no key with prefix {prefix!r}")
        if len(rows) > 1:
            raise AccountError(f"{len(rows)} keys share prefix {prefix!r}; revoke cannot tell them apart")
        if rows[0]["revoked_at"] is not None:
            raise AccountError(f"key {prefix!r} was revoked already")
        await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", rows[0]["id"])
        await audit.record(conn, actor, "key.revoke", f"account:{rows[0]['account_id']}",
                           {"key": prefix, "revoked": False}, {"key": prefix, "revoked": True})
        return rows[0]["account_id"]


async def _insert_key(conn: asyncpg.Connection, account_id: int, name: str = "") -> NewKey:
    key = keys.new_key()
    # only while the account is open: a close committed since create_key found it revoked the
    # keys there were and would never see this one. The share lock waits for a close in flight
    # and then reads its closed_at (as the web's sessions.create and apikeys.create do).
    made = await conn.fetchval(
        "INSERT INTO api_keys (account_id, prefix, secret_hash, name) SELECT a.id, $2, $3, $4"
        " FROM (SELECT id FROM accounts WHERE id = $1 AND closed_at IS NULL FOR SHARE) a RETURNING 1",
        account_id, keys.visible_prefix(key), keys.key_hash(key), name)
    if made is None:
        raise AccountError("account is closed: it gets no key")
    return NewKey(account_id=account_id, key=key, prefix=keys.visible_prefix(key))


# A key is found whatever its subscription's state: an account that cannot spend (no plan, a
# failed payment) must be told why, never "invalid key". Admission decides whether it may spend.
# A closed account's key is no key (a close revokes them all; this holds should one be left).
_AUTH_SQL = """
SELECT k.id AS api_key_id, k.account_id, s.id AS subscription_id, s.plan_id, s.status,
       coalesce(p.models, '{}') AS models, a.suspended_at IS NOT NULL AS suspended
  FROM api_keys k
  JOIN accounts a ON a.id = k.account_id AND a.closed_at IS NULL
  LEFT JOIN subscriptions s ON s.account_id = k.account_id AND s.status <> 'canceled'
  LEFT JOIN plans p ON p.id = s.plan_id
 WHERE k.secret_hash = $1 AND k.revoked_at IS NULL
"""


class Authenticator:
    """Key -> Principal, with a short in-process cache so the hot path skips the database.

    A revoked key or ended subscription keeps working for at most `ttl` seconds here; the
    ledger's admission re-checks the subscription's state in the same transaction anyway.
    """

    def __init__(self, pool: asyncpg.Pool, ttl: float,
                 on_use: Callable[[int], None] | None = None, timeout: float = 30.0) -> None:
        self._pool = pool
        self._ttl = ttl
        self._timeout = timeout  # the database's answer to a lookup, at most (`_lookup`)
        self._cache: dict[bytes, tuple[float, Principal | None]] = {}
        # told the key id of every successful authentication (the web's "last used"); must not block
        self._on_use = on_use

    async def authenticate(self, key: str) -> Principal | None:
        if not key:
            return None
        return await self.authenticate_digest(keys.key_hash(key))

    async def authenticate_digest(self, digest: bytes) -> Principal | None:
        """`authenticate` for a key already hashed (`keys.key_hash`) by the caller."""
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            if self._on_use is not None and hit[1] is not None:
                self._on_use(hit[1].api_key_id)
            return hit[1]
        row = await self._lookup(digest)
        principal = None if row is None else Principal(
            account_id=row["account_id"], api_key_id=row["api_key_id"],
            subscription_id=row["subscription_id"], plan_id=row["plan_id"],
            models=tuple(row["models"]), standing=row["status"], suspended=row["suspended"])
        # Unknown keys are not cached: a flood of made-up keys must not evict real ones. Nor
        # is a key whose account has no subscription yet: the one who just paid must not wait
        # for the cache to learn it. Nor a suspended account's: restored, its Responses socket
        # connects at once, as its HTTP requests are served at once (their admission reads the
        # account itself).
        if (self._ttl > 0 and principal is not None and principal.subscription_id is not None
                and not principal.suspended):
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[digest] = (now + self._ttl, principal)
        if self._on_use is not None and principal is not None:
            self._on_use(principal.api_key_id)
        return principal

    async def _lookup(self, digest: bytes) -> asyncpg.Record | None:
        """The key's row; a database that does not answer in `timeout` seconds is an error (the
        journey's 503), not a request left waiting as long as its client does. The query is
        left to finish on its own, not cancelled: a cancelled asyncpg query gives its connection
        back only once the cancellation reached the server, which a database that does not
        answer never confirms. Only a key not in the cache gets here."""
        sent: list[bool] = []  # once it has a connection and its query is under way
        lookup = asyncio.ensure_future(self._fetch(digest, sent))
        lookup.add_done_callback(_heard)
        try:
            done, _ = await asyncio.wait({lookup}, timeout=self._timeout)
        except asyncio.CancelledError:  # the client left
            if not sent:
                lookup.cancel()
            raise
        if not done:
            if not sent:
                lookup.cancel()
            raise TimeoutError(f"the database did not answer a key's lookup in {self._timeout} s")
        return lookup.result()

    async def _fetch(self, digest: bytes, sent: list[bool]) -> asyncpg.Record | None:
        # A lookup still waiting for a connection when it is given up (or its client leaves) is
        # cancelled, which asks nothing of the server, so given-up lookups do not take
        # connections ahead of the ledger's ticks; and that wait is bounded as well.
        async with self._pool.acquire(timeout=self._timeout) as connection:
            sent.append(True)
            return await connection.fetchrow(_AUTH_SQL, digest)


def _heard(lookup: asyncio.Future) -> None:
    """A lookup's failure is its caller's to raise; one given up on must not be reported as
    never retrieved."""
    if not lookup.cancelled():
        lookup.exception()
