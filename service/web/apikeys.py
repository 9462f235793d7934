"""An account's API keys as the web page shows them: create (named), list, revoke."""
from __future__ import annotations

import datetime as dt

import asyncpg
import msgspec

from .. import keys

MAX_NAME = 64
MAX_LIVE_KEYS = 50


class KeyRow(msgspec.Struct, frozen=True):
    id: int
    prefix: str
    name: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class CreatedKey(msgspec.Struct, frozen=True):
    id: int
    prefix: str
    name: str
    secret: str


class KeyRefusal(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


async def listing(pool: asyncpg.Pool, account_id: int) -> list[KeyRow]:
    rows = await pool.fetch(
        "SELECT id, prefix, name, created_at, last_used_at, revoked_at FROM api_keys"
        " WHERE account_id = $1 ORDER BY revoked_at IS NOT NULL, created_at DESC", account_id)
    return [KeyRow(**dict(r)) for r in rows]


async def create(pool: asyncpg.Pool, account_id: int, name: str) -> CreatedKey:
    """A new key, made only while the account is open (KeyRefusal 'account_closed': a close
    committed after the page checked its session revoked the keys there were, and would never
    see this one); 'too_many_keys' past MAX_LIVE_KEYS. The share lock waits for a close in
    flight and then reads its closed_at, as sessions.create does."""
    name = " ".join(name.split())[:MAX_NAME]
    secret = keys.new_key()
    key_id = await pool.fetchval(
        """INSERT INTO api_keys (account_id, prefix, secret_hash, name)
           SELECT a.id, $2, $3, $4
             FROM (SELECT id FROM accounts WHERE id = $1 AND closed_at IS NULL FOR SHARE) a
            WHERE (SELECT count(*) FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL) < $5
           RETURNING id""",
        account_id, keys.visible_prefix(secret), keys.key_hash(secret), name, MAX_LIVE_KEYS)
    if key_id is None:
        # which of the two (a refusal only: a close is never undone, so closed now is closed then)
        if not await pool.fetchval("SELECT 1 FROM accounts WHERE id = $1 AND closed_at IS NULL", account_id):
            raise KeyRefusal("account_closed")
        raise KeyRefusal("too_many_keys")
    return CreatedKey(id=key_id, prefix=keys.visible_prefix(secret), name=name, secret=secret)


async def revoke(pool: asyncpg.Pool, account_id: int, key_id: int) -> bool:
    """Revoke one of this account's keys; False when it is not theirs or was revoked already.
    Bridges refuse it within their authentication cache's lifetime (CODEPLAN_AUTH_CACHE_TTL)."""
    if not 0 < key_id < 2 ** 63:
        return False
    status = await pool.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND account_id = $2 AND revoked_at IS NULL",
        key_id, account_id)
    return status == "UPDATE 1"
