"""Login throttling: after repeated failures, refuse further tries for a while, per account (or
address typed, when it has none: one account guessed from many places) and per client (many
accounts guessed from one place; an IPv6 client is its /64, as for sign-ups). A refused try checks
no password, so guessing costs the attacker time, not us CPU.

Sign-ups are limited per client address too (each costs a password hash and an account row).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from typing import AsyncIterator

import asyncpg
import msgspec

WINDOW_MINUTES = 15
PER_ACCOUNT = 5     # failures for one account (or address typed, without one) within the window
PER_ADDRESS = 20    # failures from one client (address_key: IPv4 address, IPv6 /64) within the window

# Both counts of one login's keys; the same rows are what `take_login` adds to.
_RETRY_AFTER = """
WITH by_account AS (
    SELECT count(*) AS n, max(failed_at) AS last FROM login_failures
     WHERE email = $1 AND failed_at > now() - make_interval(mins => $3)
), by_address AS (
    SELECT count(*) AS n, max(failed_at) AS last FROM login_failures
     WHERE address = $2 AND failed_at > now() - make_interval(mins => $3)
)
SELECT greatest(
    CASE WHEN e.n >= $4 THEN extract(epoch FROM e.last + make_interval(mins => $3) - now()) END,
    CASE WHEN a.n >= $5 THEN extract(epoch FROM a.last + make_interval(mins => $3) - now()) END
) AS seconds
  FROM by_account e, by_address a
"""


def login_key(account_id: int | None, lowered: str) -> str:
    """What one login's per-account count is kept under: the account when the typed address has
    one (however it was typed), else the typed text as PostgreSQL's lower() folds it, the folding
    the account lookup uses (Python's lower() differs, e.g. on 'İ'). The prefixes keep an account
    and a text from ever sharing a count. The `email` column holds this key."""
    return f"account:{account_id}" if account_id is not None else "email:" + lowered[:320]


class _KeyedLocks:
    """An asyncio lock per key, kept while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


# This process's logins of one key wait here, holding no connection: the pool is the ledger's
# too, and a flood of logins for one account must not park its connections in a lock wait.
_waiting = _KeyedLocks()
# Another process holding the key's lock longer than this (a slow or vanished peer) gets the
# login refused for a moment rather than a connection held for as long.
LOCK_WAIT = "2s"


async def take_login(pool: asyncpg.Pool, key: str, address: str) -> int | None:
    """Count one login attempt as a failure before its password is checked: None when it may go
    ahead (then `succeeded` takes the count back), else the seconds until it may (the refusal is
    not counted). Counting first, under one lock per account key and per client, means parallel
    guesses cannot all pass the check before any failure is written: at most the limit's worth
    of passwords are hashed per window."""
    client = address_key(address)
    account_lock, client_lock = "codeplan:login:" + key, "codeplan:login-from:" + client
    # always this order (account, then client), here and in the database, so two logins cannot
    # wait on each other
    async with _waiting.hold(account_lock), _waiting.hold(client_lock):
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'")
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", account_lock)
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", client_lock)
                seconds = await conn.fetchval(_RETRY_AFTER, key, client, WINDOW_MINUTES, PER_ACCOUNT, PER_ADDRESS)
                if seconds is not None and seconds > 0:
                    return int(seconds) + 1
                await conn.execute("INSERT INTO login_failures (email, address) VALUES ($1, $2)", key, client)
        except asyncpg.LockNotAvailableError:
            return 1  # another process's login of this key is stuck: try again in a moment
    return None


async def succeeded(pool: asyncpg.Pool, key: str) -> None:
    """The right password: the account's failures are forgotten, this attempt's with them."""
    await pool.execute("DELETE FROM login_failures WHERE email = $1", key)


async def forget_account(conn: asyncpg.Connection | asyncpg.Pool, account_id: int) -> None:
    """A password set by a reset link: the account's failures are forgotten (not its clients':
    a client that guessed many accounts stays limited)."""
    await conn.execute("DELETE FROM login_failures WHERE email = $1", login_key(account_id, ""))


# ---- sign-ups ---------------------------------------------------------------------------

class SignupLimit(msgspec.Struct, frozen=True):
    """At most `limit` sign-ups from `address` per `window` seconds."""
    address: str
    limit: int
    window: float


def address_key(address: str) -> str:
    """What one client is: its IPv4 address, or the /64 its IPv6 address is in (one machine is
    handed a whole /64 and picks any address in it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


async def take_signup(pool: asyncpg.Pool, limit: SignupLimit) -> int | None:
    """Count one sign-up against its address: None when it may go ahead, else the seconds until
    a place frees up (the refusal is not counted). One transaction per address at a time, so two
    sign-ups at once cannot both take the last place."""
    key = address_key(limit.address)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "codeplan:signup:" + key)
        # the attempt whose ageing out frees a place, when all `limit` places are taken
        blocking = await conn.fetchval(
            "SELECT extract(epoch FROM at + make_interval(secs => $2) - now()) FROM signup_attempts"
            " WHERE address = $1 AND at > now() - make_interval(secs => $2)"
            " ORDER BY at DESC OFFSET $3 - 1 LIMIT 1", key, float(limit.window), limit.limit)
        if blocking is not None:
            return max(1, int(blocking) + 1)
        await conn.execute("INSERT INTO signup_attempts (address) VALUES ($1)", key)
    return None
