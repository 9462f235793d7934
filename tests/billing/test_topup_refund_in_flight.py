"""A refund of a top-up while requests in flight hold part of it (review finding 2), straight
against PostgreSQL and the ledger's own functions: the part they hold is taken back as they
settle, so a refunded block never becomes spendable again, whatever the order of events."""
from __future__ import annotations

import asyncio
import uuid

import asyncpg

from ..conftest import new_plan, new_user

BLOCK = 50_000  # credits (tokens of glm-4.6) in the block, bought for 1000 cents


async def _setup(url: str, *, attach: bool = True) -> tuple[asyncpg.Connection, int, int, int | None, int]:
    """A plan whose 5-hour window is spent down to 5,100 credits, and a block; the connection,
    subscription, key, block window (None when not attached) and top-up id."""
    plan = new_plan(url, 50_000, 1_000_000)
    new_user(url, plan)
    conn = await asyncpg.connect(url)
    account, sub, key = await conn.fetchrow(
        "SELECT s.account_id, s.id, k.id FROM subscriptions s JOIN api_keys k ON k.account_id = s.account_id"
        " WHERE s.plan_id = $1", plan)
    topup = await conn.fetchval(
        "INSERT INTO topups (account_id, tokens, amount, currency, expires_at, stripe_checkout_session_id,"
        " stripe_payment_intent_id) VALUES ($1, $2, 1000, 'usd', now() + interval '30 days', $3, $4) RETURNING id",
        account, BLOCK, "cs_" + uuid.uuid4().hex, "pi_" + uuid.uuid4().hex)
    window = await conn.fetchval("SELECT billing_topup_attach($1)", topup) if attach else None
    first = uuid.uuid4()
    await conn.fetch("SELECT * FROM ledger_admit($1, $2, $3, 'chat', 'glm-4.6', 100, 45000, 45000, 60)", first, sub, key)
    await conn.fetch("SELECT * FROM ledger_settle($1, 'posted', 100, 44800, 0, 0, false, 'done', NULL)", first)
    return conn, sub, key, window, topup


async def _admit(conn: asyncpg.Connection, sub: int, key: int, held: int) -> uuid.UUID:
    """A request whose worst case the plan's 5,100 credits cannot hold: the block holds the rest."""
    entry = uuid.uuid4()
    row = await conn.fetchrow("SELECT * FROM ledger_admit($1, $2, $3, 'chat', 'glm-4.6', 100, 2100, $4, 60)",
                              entry, sub, key, held)
    assert row["outcome"] == "admitted", dict(row)
    return entry


async def _settle(conn: asyncpg.Connection, entry: uuid.UUID, completion: int, state: str = "posted") -> None:
    await conn.fetch("SELECT * FROM ledger_settle($1, $2, 100, $3, 0, 0, false, 'done', NULL)", entry, state, completion)


async def _window(conn: asyncpg.Connection, window: int) -> asyncpg.Record:
    return await conn.fetchrow("SELECT allowance, posted, held, revoke_owed FROM quota_windows WHERE id = $1", window)


async def _refund(conn: asyncpg.Connection, topup: int, cents: int) -> int:
    intent = await conn.fetchval("SELECT stripe_payment_intent_id FROM topups WHERE id = $1", topup)
    return await conn.fetchval("SELECT billing_topup_refund($1, $2)", intent, cents)


def _room(window: asyncpg.Record) -> int:
    return window["allowance"] - window["posted"] - window["held"]


async def test_a_full_refund_takes_back_what_requests_in_flight_held_once_they_settle(fresh_database):
    conn, sub, key, window, topup = await _setup(fresh_database)
    try:
        entry = await _admit(conn, sub, key, 40_000)  # 5,100 in the plan, 34,900 in the block
        assert (await _window(conn, window))["held"] == 34_900
        assert await _refund(conn, topup, 1000) == BLOCK  # refunded in full
        now = await _window(conn, window)
        # what was neither spent nor held is gone at once; the held part is owed
        assert (now["allowance"], now["revoke_owed"], _room(now)) == (34_900, 34_900, 0)
        # the request settles far below its hold (the plan pays the 150 it cost): the block's hold
        # is released, and taken back in the same statement
        await _settle(conn, entry, 50)
        after = await _window(conn, window)
        assert (after["allowance"], after["posted"], after["held"], after["revoke_owed"]) == (0, 0, 0, 0)
        assert await _refund(conn, topup, 1000) == 0  # the event redelivered: nothing more
        assert _room(await _window(conn, window)) == 0
        # and nothing can be drawn on it: a request the plan cannot hold is refused
        refused = await conn.fetchrow("SELECT * FROM ledger_admit($1, $2, $3, 'chat', 'glm-4.6', 100, 2100, 40000, 60)",
                                      uuid.uuid4(), sub, key)
        assert refused["outcome"] == "window_full"
        row = await conn.fetchrow("SELECT tokens_revoked, amount_refunded FROM topups WHERE id = $1", topup)
        assert (row["tokens_revoked"], row["amount_refunded"]) == (BLOCK, 1000)
    finally:
        await conn.close()


async def test_what_the_requests_in_flight_spent_stays_spent_and_nothing_more_comes_back(fresh_database):
    conn, sub, key, window, topup = await _setup(fresh_database)
    try:
        spent = await _admit(conn, sub, key, 40_000)
        voided = await _admit(conn, sub, key, 10_000)  # the plan has no room left: all in the block
        assert (await _window(conn, window))["held"] == 34_900 + 10_000
        await _refund(conn, topup, 1000)
        # the first one spends 20,000 credits: 5,100 from the plan, 14,900 from the block
        await _settle(conn, spent, 19_900)
        mid = await _window(conn, window)
        assert (mid["posted"], mid["held"], _room(mid)) == (14_900, 10_000, 0)
        await _settle(conn, voided, 0, state="voided")  # the second one fails upstream: nothing spent
        end = await _window(conn, window)
        # the block is down to what was spent before the refund could reach it; the rest is gone
        assert (end["allowance"], end["posted"], end["held"], _room(end)) == (14_900, 14_900, 0, 0)
        assert end["revoke_owed"] == 14_900  # revoked but spent before it could be taken
    finally:
        await conn.close()


async def test_a_partial_refund_caps_the_block_so_released_holds_are_not_spendable(fresh_database):
    conn, sub, key, window, topup = await _setup(fresh_database)
    try:
        entry = await _admit(conn, sub, key, 40_000)  # 34,900 held in the block, 15,100 free
        assert await _refund(conn, topup, 800) == 40_000  # 80% of the money: 40,000 credits revoked
        now = await _window(conn, window)
        assert (now["allowance"], now["revoke_owed"], _room(now)) == (34_900, 24_900, 0)
        await _settle(conn, entry, 50)
        after = await _window(conn, window)
        # 20% of the block stays spendable, not a credit more
        assert (after["allowance"], after["revoke_owed"], _room(after)) == (10_000, 0, 10_000)
        # the rest of the money refunded later takes the rest
        assert await _refund(conn, topup, 1000) == 10_000
        assert _room(await _window(conn, window)) == 0
    finally:
        await conn.close()


async def test_a_refund_and_settlements_racing_leave_the_same_block(fresh_database):
    """Settlements and the refund on separate connections, in every interleaving the locks allow:
    the block ends at its refunded share, never more."""
    conn, sub, key, window, topup = await _setup(fresh_database)
    try:
        entries = [await _admit(conn, sub, key, 7_000) for _ in range(6)]  # 5,100 of the first in the plan
        held = (await _window(conn, window))["held"]
        assert held == 6 * 7_000 - 5_100
        others = [await asyncpg.connect(fresh_database) for _ in entries]
        try:
            await asyncio.gather(_refund(conn, topup, 500),
                                 *(_settle(c, e, 10) for c, e in zip(others, entries)))
        finally:
            for other in others:
                await other.close()
        end = await _window(conn, window)
        # 110 credits each: the plan paid the first, the block the five others (their plan part was 0)
        assert (end["posted"], end["held"], end["revoke_owed"]) == (5 * 110, 0, 0)
        # half the money back: half the block revoked, all of it taken in the end
        assert end["allowance"] == BLOCK // 2
    finally:
        await conn.close()


async def test_a_block_refunded_before_it_is_attached_starts_at_what_is_left(fresh_database):
    conn, sub, key, _, topup = await _setup(fresh_database, attach=False)
    try:
        assert await _refund(conn, topup, 250) == BLOCK // 4
        window = await conn.fetchval("SELECT billing_topup_attach($1)", topup)
        start = await _window(conn, window)
        assert (start["allowance"], start["revoke_owed"]) == (BLOCK - BLOCK // 4, 0)
    finally:
        await conn.close()


async def _money_back(conn: asyncpg.Connection, topup: int, refunded: int, disputed: int) -> int:
    intent = await conn.fetchval("SELECT stripe_payment_intent_id FROM topups WHERE id = $1", topup)
    return await conn.fetchval("SELECT billing_topup_money_back($1, $2, $3)", intent, refunded, disputed)


async def test_a_dispute_won_gives_back_what_it_took_and_forgives_what_was_still_owed(fresh_database):
    conn, sub, key, window, topup = await _setup(fresh_database)
    try:
        entry = await _admit(conn, sub, key, 40_000)  # the block holds 34,900
        # a quarter refunded, then the rest disputed (a chargeback withdraws it): all of it revoked,
        # what requests in flight hold owed
        assert await _money_back(conn, topup, 250, 0) == BLOCK // 4
        assert await _money_back(conn, topup, 250, 750) == BLOCK - BLOCK // 4
        now = await _window(conn, window)
        assert (now["allowance"], now["revoke_owed"], _room(now)) == (34_900, 34_900, 0)
        assert await _money_back(conn, topup, 250, 750) == 0  # redelivered: nothing
        # the bank decides for us: the disputed three quarters come back, the refunded quarter
        # stays revoked; the owed part is forgiven first, the rest goes back to the allowance
        assert await _money_back(conn, topup, 250, 0) == -(BLOCK - BLOCK // 4)
        won = await _window(conn, window)
        assert (won["allowance"], won["held"], won["revoke_owed"]) == (BLOCK - BLOCK // 4, 34_900, 0)
        # what the block is worth now: bought less the refunded quarter, whatever the order of events
        await _settle(conn, entry, 50)
        after = await _window(conn, window)
        assert after["revoke_owed"] == 0
        assert after["allowance"] == BLOCK - BLOCK // 4
        row = await conn.fetchrow("SELECT amount_refunded, amount_disputed, tokens_revoked FROM topups WHERE id = $1",
                                  topup)
        assert tuple(row) == (250, 0, BLOCK // 4)
        # an older process's refund call keeps the dispute figure the newer one recorded
        assert await _money_back(conn, topup, 250, 750) == BLOCK - BLOCK // 4
        assert await _refund(conn, topup, 250) == 0
        assert (await conn.fetchval("SELECT tokens_revoked FROM topups WHERE id = $1", topup)) == BLOCK
    finally:
        await conn.close()
