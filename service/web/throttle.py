"""Login throttling: after repeated failures, refuse further tries for a while, per address
typed (one account guessed from many places) and per client address (many accounts guessed from
one place). A refused try checks no password, so guessing costs the attacker time, not us CPU.

Sign-ups are limited per client address too (each costs a password hash and an account row).
"""
from __future__ import annotations

import ipaddress

import asyncpg
import msgspec

WINDOW_MINUTES = 15
PER_ACCOUNT = 5     # failures for one email within the window
PER_ADDRESS = 20    # failures from one client address within the window

_RETRY_AFTER = """
WITH by_email AS (
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
  FROM by_email e, by_address a
"""


async def retry_after(pool: asyncpg.Pool, email: str, address: str) -> int | None:
    """Seconds until this email may try again from this address, or None when it may now."""
    seconds = await pool.fetchval(_RETRY_AFTER, email.lower(), address, WINDOW_MINUTES,
                                  PER_ACCOUNT, PER_ADDRESS)
    return None if seconds is None or seconds <= 0 else int(seconds) + 1


async def failed(pool: asyncpg.Pool, email: str, address: str) -> None:
    await pool.execute("INSERT INTO login_failures (email, address) VALUES ($1, $2)",
                       email.lower()[:320], address)


async def succeeded(pool: asyncpg.Pool, email: str) -> None:
    await pool.execute("DELETE FROM login_failures WHERE email = $1", email.lower())


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
