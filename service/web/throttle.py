"""Login throttling: after repeated failures, refuse further tries for a while, per address
typed (one account guessed from many places) and per client address (many accounts guessed from
one place). A refused try checks no password, so guessing costs the attacker time, not us CPU.
"""
from __future__ import annotations

import asyncpg

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
