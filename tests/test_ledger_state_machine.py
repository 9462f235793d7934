"""The ledger's transitions, straight against PostgreSQL: guarded, atomic, replay-safe."""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import NamedTuple

import asyncpg
import pytest

from service import db
from bridge.flight import void_abandoned
from bridge.ports import Reservation
from service.ledger import Ledger, Usage, _admit_arguments

from .conftest import new_plan, new_user, query, run


async def _subscription(url: str, plan: str) -> tuple[int, int]:
    rows = await query(url, "SELECT s.id AS sub, k.id AS key FROM subscriptions s JOIN api_keys k"
                            " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan)
    return rows[0]["sub"], rows[0]["key"]


@pytest.fixture
def setup(fresh_database):
    plan = new_plan(fresh_database, window=10_000, weekly=30_000)
    new_user(fresh_database, plan)
    return fresh_database, plan


def admit(ledger: Ledger, entry: uuid.UUID, *, subscription_id: int, api_key_id: int, prompt_estimate: int,
          reserve: int, held: int | None = None, surface: str = "chat", model: str = "glm-4.6"):
    """Admission as the bridge asks for it; `held` (the proven worst case) defaults to `reserve`."""
    return ledger.admit(Reservation(entry, subscription_id, api_key_id, surface, model, prompt_estimate,
                                    reserve, reserve if held is None else held))


async def _ledger(url: str, lease: float = 60.0) -> tuple[asyncpg.Pool, Ledger]:
    pool = await db.create_pool(url, size=20)
    return pool, Ledger(pool, lease_seconds=lease)


class Env(NamedTuple):
    url: str
    pool: asyncpg.Pool
    ledger: Ledger
    sub: int
    key: int


@pytest.fixture
async def env(setup):
    """A subscription on the setup plan (10,000 per 5 hours, 30,000 a week) and a ledger on it."""
    url, plan = setup
    sub, key = await _subscription(url, plan)
    pool, ledger = await _ledger(url)
    yield Env(url, pool, ledger, sub, key)
    await pool.close()


async def _windows(url: str) -> dict[str, asyncpg.Record]:
    return {r["kind"]: r for r in await query(url, "SELECT * FROM quota_windows")}


async def test_post_moves_reservation_to_usage_once(env):
    url, pool, ledger, sub, key = env
    entry = uuid.uuid4()
    admission = await admit(ledger, entry, subscription_id=sub, api_key_id=key, surface="chat",
                                   model="glm-4.6", prompt_estimate=100, reserve=1100)
    assert admission.admitted
    windows = await _windows(url)
    assert windows["5h"]["reserved"] == windows["week"]["reserved"] == 1100
    usage = Usage(prompt_tokens=120, completion_tokens=30, cached_tokens=100)
    # cached tokens at the plan's weight 0.2: 20 + ceil(100 * 0.2) + 30
    assert await ledger.post(entry, usage, estimated=False, reason="t") == 70
    assert await ledger.post(entry, usage, estimated=False, reason="replay") is None
    assert await ledger.void(entry, reason="late void") is None
    windows = await _windows(url)
    assert (windows["5h"]["reserved"], windows["5h"]["posted"]) == (0, 70)
    assert (windows["week"]["reserved"], windows["week"]["posted"]) == (0, 70)
    row = (await query(url, "SELECT * FROM usage_ledger WHERE id = $1", entry))[0]
    assert (row["state"], row["billed_tokens"], row["settle_reason"]) == ("posted", 70, "t")


async def test_racing_settlers_apply_exactly_one(env):
    url, pool, ledger, sub, key = env
    entry = uuid.uuid4()
    await admit(ledger, entry, subscription_id=sub, api_key_id=key, surface="chat",
                       model="glm-4.6", prompt_estimate=10, reserve=500)
    results = await asyncio.gather(
        *(ledger.post(entry, Usage(prompt_tokens=10, completion_tokens=i), estimated=False, reason=str(i))
          for i in range(1, 11)),
        *(ledger.void(entry, reason="v") for _ in range(5)))
    applied = [r for r in results if r is not None]
    assert len(applied) == 1
    windows = await _windows(url)
    assert windows["5h"]["reserved"] == 0 and windows["5h"]["posted"] == applied[0]


async def test_admission_replay_and_refusals(env):
    url, pool, ledger, sub, key = env
    entry = uuid.uuid4()
    args = dict(subscription_id=sub, api_key_id=key, surface="chat", model="glm-4.6", prompt_estimate=1)
    assert (await admit(ledger, entry, reserve=6000, **args)).admitted
    assert (await admit(ledger, entry, reserve=6000, **args)).outcome == "replayed"
    full = await admit(ledger, uuid.uuid4(), reserve=6000, **args)
    assert (full.outcome, full.window_kind) == ("window_full", "5h")
    assert full.resets_at > dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=4, minutes=59)
    too_large = await admit(ledger, uuid.uuid4(), reserve=10_001, **args)
    assert (too_large.outcome, too_large.window_kind, too_large.allowance) == ("too_large", "5h", 10_000)
    # the refused requests left no trace
    assert len(await query(url, "SELECT 1 FROM usage_ledger")) == 1


async def test_five_hour_window_reopens_after_it_closes_weekly_window_holds(env):
    url, pool, ledger, sub, key = env
    args = dict(subscription_id=sub, api_key_id=key, surface="chat", model="glm-4.6", prompt_estimate=1)
    for _ in range(3):
        entry = uuid.uuid4()
        assert (await admit(ledger, entry, reserve=9000, **args)).admitted
        await ledger.post(entry, Usage(prompt_tokens=9000), estimated=False, reason="t")
        # close the 5-hour window as if five hours had passed
        await query(url, "UPDATE quota_windows SET starts_at = starts_at - interval '5 hours',"
                         " ends_at = now() - interval '1 second' WHERE kind = '5h'")
    refused = await admit(ledger, uuid.uuid4(), reserve=4000, **args)
    assert (refused.outcome, refused.window_kind) == ("window_full", "week")
    windows = await query(url, "SELECT kind, posted FROM quota_windows ORDER BY id")
    assert [(w["kind"], w["posted"]) for w in windows] == [
        ("week", 27000), ("5h", 9000), ("5h", 9000), ("5h", 9000)]
    started = (await query(url, "SELECT started_at FROM subscriptions WHERE id = $1", sub))[0]["started_at"]
    week = (await query(url, "SELECT starts_at FROM quota_windows WHERE kind = 'week'"))[0]["starts_at"]
    assert week == started  # anchored to the subscription's start


async def test_concurrent_admissions_never_overbook(env):
    url, pool, ledger, sub, key = env
    results = await asyncio.gather(*(admit(ledger, 
        uuid.uuid4(), subscription_id=sub, api_key_id=key, surface="chat", model="glm-4.6",
        prompt_estimate=1, reserve=700) for _ in range(100)))
    assert sum(r.admitted for r in results) == 14  # 14 * 700 <= 10,000 < 15 * 700
    assert {r.outcome for r in results} == {"admitted", "window_full"}
    assert (await _windows(url))["5h"]["reserved"] == 9800


async def _capped(url: str, max_concurrent: int) -> tuple[asyncpg.Pool, Ledger, dict]:
    """A user on a plan of `max_concurrent` requests at a time, a ledger, and `admit`'s arguments."""
    plan = new_plan(url, window=100_000, max_concurrent=max_concurrent)
    new_user(url, plan)
    sub, key = await _subscription(url, plan)
    pool, ledger = await _ledger(url)
    return pool, ledger, dict(subscription_id=sub, api_key_id=key, surface="chat", model="glm-4.6", prompt_estimate=1)


async def test_concurrency_cap(fresh_database):
    pool, ledger, args = await _capped(fresh_database, max_concurrent=2)
    try:
        first = uuid.uuid4()
        assert (await admit(ledger, first, reserve=10, **args)).admitted
        assert (await admit(ledger, uuid.uuid4(), reserve=10, **args)).admitted
        assert (await admit(ledger, uuid.uuid4(), reserve=10, **args)).outcome == "concurrency"
        await ledger.void(first, reason="t")
        assert (await admit(ledger, uuid.uuid4(), reserve=10, **args)).admitted
    finally:
        await pool.close()


async def test_a_request_sent_again_after_its_client_left_is_not_refused_by_its_own_abandoned_slot(fresh_database):
    """A client that gives up on a request while it is being admitted and sends it again at once
    (a plan with one request at a time): the first, admitted for nobody, is voided in the ticker's
    next tick with the second, settlements first, so the second is admitted, not refused for
    the slot of a request nobody will ever send."""
    pool, ledger, args = await _capped(fresh_database, max_concurrent=1)
    try:
        for _ in range(5):
            given_up = admit(ledger, uuid.uuid4(), reserve=10, **args)
            while ledger._ticker._sent_at is None:  # its tick is in flight
                await asyncio.sleep(0)
            given_up.cancel()
            again = uuid.uuid4()
            assert (await admit(ledger, again, reserve=10, **args)).admitted
            await ledger.void(again, reason="t")
    finally:
        await pool.close()


async def _one_at_a_time(url: str, sub: int, key: int, requests: int = 10) -> None:
    """`requests` requests of one client, one at a time: each admitted (holding 200, using 10)
    and answered, its settlement on its way while the next is admitted."""
    pool, ledger = await _ledger(url)
    args = dict(subscription_id=sub, api_key_id=key, surface="chat", model="glm-4.6", prompt_estimate=1)
    try:
        settling = []
        for _ in range(requests):
            entry = uuid.uuid4()
            admission = await admit(ledger, entry, reserve=10, held=200, **args)
            assert admission.admitted, admission
            settling.append(asyncio.ensure_future(ledger.post(entry, Usage(prompt_tokens=1, completion_tokens=9),
                                                              estimated=False, reason="t")))
            await asyncio.sleep(0)  # answered: its settlement waits, the next request comes
        assert await asyncio.gather(*settling) == [10] * requests
    finally:
        await pool.close()


async def test_one_request_at_a_time_is_never_refused_by_the_settlement_before_it(fresh_database):
    # The settlement of an answered request lingers (service/ledger.py `_Ticker`), so the next
    # admission goes without it; on a plan of one request at a time, and a window with room
    # for one hold, each next request must still be admitted, as if settled first.
    plan = new_plan(fresh_database, window=399, weekly=100_000, max_concurrent=1)
    new_user(fresh_database, plan)
    await _one_at_a_time(fresh_database, *await _subscription(fresh_database, plan))
    windows = await _windows(fresh_database)
    assert (windows["5h"]["posted"], windows["5h"]["held"]) == (100, 0)


async def test_a_request_the_plan_can_hold_draws_nothing_from_a_top_up_while_the_last_settles(fresh_database):
    # The same, with a top-up instead of a cap: while the request before still holds the
    # window, the next one would fit only with part of it on the top-up; settled first, the plan
    # holds it all, so nothing may go on the top-up (migrations/0041).
    plan = new_plan(fresh_database, window=399, weekly=100_000)
    new_user(fresh_database, plan)
    sub, key = await _subscription(fresh_database, plan)
    await query(fresh_database, "INSERT INTO quota_windows (subscription_id, kind, starts_at, ends_at, allowance)"
                                " VALUES ($1, 'topup', now() - interval '1 minute', now() + interval '1 day', 100000)",
                sub)
    await _one_at_a_time(fresh_database, sub, key)
    rows = await query(fresh_database, "SELECT * FROM usage_ledger WHERE subscription_id = $1", sub)
    assert len(rows) == 10
    assert all(r["extra_window_id"] is None and r["extra_billed_tokens"] == 0 for r in rows)
    assert (await _windows(fresh_database))["topup"]["posted"] == 0


async def test_sweeper_expires_only_lapsed_leases_at_what_they_proved(env):
    url, pool, ledger, sub, key = env
    ledger = Ledger(pool, lease_seconds=0.2)
    args = dict(subscription_id=sub, api_key_id=key, surface="chat", model="glm-4.6")
    silent, proven, alive = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await admit(ledger, silent, prompt_estimate=40, reserve=1000, **args)
    await admit(ledger, proven, prompt_estimate=50, reserve=1000, **args)
    await admit(ledger, alive, prompt_estimate=60, reserve=1000, **args)
    await ledger.heartbeat(proven, 17)
    await asyncio.sleep(0.3)
    long_lease = Ledger(pool, lease_seconds=60)
    await long_lease.heartbeat(alive, 5)
    assert await ledger.expire_due() == 2
    assert await ledger.expire_due() == 0
    rows = {r["id"]: r for r in await query(url, "SELECT * FROM usage_ledger")}
    assert (rows[silent]["state"], rows[silent]["billed_tokens"], rows[silent]["estimated"]) == ("expired", 40, True)
    assert (rows[proven]["state"], rows[proven]["billed_tokens"], rows[proven]["completion_tokens"]) == ("expired", 67, 17)
    assert rows[alive]["state"] == "pending"
    # a late settlement by a process that was only slow changes nothing
    assert await ledger.post(silent, Usage(prompt_tokens=1, completion_tokens=1), estimated=False, reason="late") is None
    windows = await _windows(url)
    assert (windows["5h"]["reserved"], windows["5h"]["posted"]) == (1000, 107)


async def test_rollup_keeps_every_total(env):
    url, pool, ledger, sub, key = env
    args = dict(subscription_id=sub, api_key_id=key, surface="chat", prompt_estimate=1, reserve=100)
    from service.usage import totals
    for i, model in enumerate(["glm-4.6", "glm-4.6", "glm-4.5-air", "glm-4.6"]):
        entry = uuid.uuid4()
        await admit(ledger, entry, model=model, **args)
        if i == 3:
            await ledger.void(entry, reason="t")
        else:
            await ledger.post(entry, Usage(prompt_tokens=10 + i, completion_tokens=5, cached_tokens=5),
                              estimated=False, reason="t")
    pending = uuid.uuid4()
    await admit(ledger, pending, model="glm-4.6", **args)
    start = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    end = start + dt.timedelta(days=1)
    before = await totals(pool, sub, start, end)
    windows_before = await _windows(url)
    assert await ledger.rollup(end) == 4  # whole UTC days: up to tomorrow's midnight
    assert await totals(pool, sub, start, end) == before
    assert before["glm-4.6"].requests == 2 and before["glm-4.5-air"].prompt_tokens == 12
    assert await _windows(url) == windows_before
    assert [r["state"] for r in await query(url, "SELECT state FROM usage_ledger")] == ["pending"]


async def _settled(url: str, entry: uuid.UUID, within: float = 10.0) -> asyncpg.Record:
    """The entry once it is no longer pending (its void is written after its caller is answered),
    or as it is after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        [row] = await query(url, "SELECT state, billed_tokens, settle_reason FROM usage_ledger WHERE id = $1", entry)
        if row["state"] != "pending" or asyncio.get_running_loop().time() > deadline:
            return row
        await asyncio.sleep(0.05)


async def test_an_admission_committed_whose_answer_is_lost_is_voided_not_billed(env):
    """`ledger_admit_batch` commits and the reply never arrives (the connection dropped after
    COMMIT), for the batch and for the admission tried alone: the caller gets the error (a 503,
    nothing forwarded), and the entry, pending in PostgreSQL, is voided. Left pending, the
    sweeper would expire it at its prompt estimate: a charge for an answer nobody got."""
    url, pool, ledger, sub, key = env
    real_tick = ledger._ticker._tick

    async def lost_after_commit(settles, admits, plan_only):
        answer = await real_tick(settles, admits, plan_only)
        if admits:
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        return answer
    ledger._ticker._tick = lost_after_commit
    entry = uuid.uuid4()
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await admit(ledger, entry, subscription_id=sub, api_key_id=key, prompt_estimate=300, reserve=1300)
    ledger._ticker._tick = real_tick
    row = await _settled(url, entry)
    assert (row["state"], row["billed_tokens"], row["settle_reason"]) == ("voided", 0, "admission abandoned")
    windows = await _windows(url)
    assert (windows["5h"]["reserved"], windows["5h"]["posted"]) == (0, 0)
    assert await ledger.expire_due() == 0  # nothing left for the sweeper to bill


async def test_a_void_of_an_abandoned_admission_waits_for_the_admission_still_waiting_on_its_subscription(env):
    """The admission's connection was lost while its statement waited in PostgreSQL for the
    subscription's flight row (another tick held it): the caller was told 503, and the statement
    commits later. A void that looked for the entry at once found nothing and changed nothing,
    and the entry, committed after it, was left to the sweeper, who bills its prompt estimate.
    The void's tick takes the subscription's flight row whether or not the entry is there
    (migrations/0043), so it waits for that admission and voids what it committed."""
    url, pool, ledger, sub, key = env
    entry = uuid.uuid4()
    holder = await asyncpg.connect(url)  # another tick, holding the subscription's flight row
    admitting = await asyncpg.connect(url)  # the admission's connection, whose answer is lost
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM subscription_flights WHERE subscription_id = $1 FOR NO KEY UPDATE", sub)
        reservation = Reservation(entry, sub, key, "chat", "glm-4.6", 300, 1300, 1300)
        statement = asyncio.ensure_future(admitting.fetch(
            "SELECT * FROM ledger_admit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            *_admit_arguments([reservation]), 60.0, [False]))
        while not await query(url, "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                              admitting.get_server_pid()):
            await asyncio.sleep(0.01)
        void_abandoned(ledger, reservation, 60.0)  # what the ticker does with a lost answer
        # the void's tick queues behind the admission (one that does not wait lands meanwhile)
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline and not await query(
                url, "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%ledger_tick%'"
                     " AND datname = current_database()"):
            await asyncio.sleep(0.01)
        await holder.execute("COMMIT")
        assert (await statement)[0]["outcome"] == "admitted"  # committed, its answer unheard
        row = await _settled(url, entry)
        assert (row["state"], row["billed_tokens"], row["settle_reason"]) == ("voided", 0, "admission abandoned")
        assert (await _windows(url))["5h"]["reserved"] == 0
        assert await ledger.expire_due() == 0
        # it found its entry: no mark (migrations/0044) is left for it
        assert await query(url, "SELECT * FROM ledger_void_marks") == []
    finally:
        await holder.close()
        await admitting.close()


async def test_a_void_of_an_abandoned_admission_still_on_its_way_to_its_subscription_leaves_a_mark_it_reads(env):
    """The same, with the admission's statement still waiting for another subscription's flight
    row (a tick of two locks them in id order) when the void's tick takes this one: the void finds
    no entry and leaves a mark under that row (migrations/0044); the admission, once it holds the
    row, reads it and writes nothing. Without the mark its entry committed after the void and was
    left to the sweeper, who bills its prompt estimate."""
    url, pool, ledger, first, first_key = env
    plan = (await query(url, "SELECT plan_id FROM subscriptions WHERE id = $1", first))[0]["plan_id"]
    new_user(url, plan)
    [other] = await query(url, "SELECT s.id AS sub, k.id AS key FROM subscriptions s JOIN api_keys k"
                               " ON k.account_id = s.account_id WHERE s.plan_id = $1 AND s.id <> $2", plan, first)
    assert other["sub"] > first  # its row is locked after the first's
    before = Reservation(uuid.uuid4(), first, first_key, "chat", "glm-4.6", 300, 1300, 1300)
    abandoned = Reservation(uuid.uuid4(), other["sub"], other["key"], "chat", "glm-4.6", 300, 1300, 1300)
    holder = await asyncpg.connect(url)  # another tick, holding the first subscription's row
    admitting = await asyncpg.connect(url)  # the batch's connection, whose answer is lost
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM subscription_flights WHERE subscription_id = $1 FOR NO KEY UPDATE",
                             first)
        statement = asyncio.ensure_future(admitting.fetch(
            "SELECT * FROM ledger_admit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            *_admit_arguments([before, abandoned]), 60.0, [False, False]))
        while not await query(url, "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                              admitting.get_server_pid()):
            await asyncio.sleep(0.01)
        void_abandoned(ledger, abandoned, 60.0)  # its row is free: the void's tick commits now
        deadline = asyncio.get_running_loop().time() + 10
        while not await query(url, "SELECT 1 FROM ledger_void_marks WHERE id = $1", abandoned.entry_id):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await holder.execute("COMMIT")
        outcomes = {r["i"]: r["outcome"] for r in await statement}
        assert outcomes == {1: "admitted", 2: "voided"}
        assert await query(url, "SELECT * FROM usage_ledger WHERE id = $1", abandoned.entry_id) == []
        windows = await query(url, "SELECT reserved, held FROM quota_windows WHERE subscription_id = $1",
                              other["sub"])
        assert windows and all((w["reserved"], w["held"]) == (0, 0) for w in windows)
        [flight] = await query(url, "SELECT in_flight FROM subscription_flights WHERE subscription_id = $1",
                               other["sub"])
        assert flight["in_flight"] == 0
        assert await ledger.expire_due() == 0  # nothing for the sweeper to bill
    finally:
        await holder.close()
        await admitting.close()


async def test_a_retry_queued_behind_its_own_first_try_is_answered_replayed(env):
    """A tick whose connection was lost is tried once more whole (service/ledger.py `_after`),
    and its first try may still be alive in PostgreSQL, waiting for a flight row. The retry,
    queued behind it, reads what was admitted once it holds the row (migrations/0044): it answers
    'replayed', where a check before the lock found nothing and the insert then failed on the
    entry's key (and the ticker fell back to one request at a time)."""
    url, pool, ledger, sub, key = env
    reservation = Reservation(uuid.uuid4(), sub, key, "chat", "glm-4.6", 300, 1300, 1300)
    holder, lost, retry = [await asyncpg.connect(url) for _ in range(3)]
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM subscription_flights WHERE subscription_id = $1 FOR NO KEY UPDATE", sub)
        tries = []
        for conn in (lost, retry):
            tries.append(asyncio.ensure_future(conn.fetch(
                "SELECT * FROM ledger_admit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                *_admit_arguments([reservation]), 60.0, [False])))
            while not await query(url, "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                                  conn.get_server_pid()):
                await asyncio.sleep(0.01)
        await holder.execute("COMMIT")
        assert [(await t)[0]["outcome"] for t in tries] == ["admitted", "replayed"]
        assert (await _windows(url))["5h"]["reserved"] == 1300  # held once
    finally:
        for conn in (holder, lost, retry):
            await conn.close()


async def test_void_marks_are_forgotten_after_a_day(env):
    url, pool, ledger, sub, key = env
    old, new = uuid.uuid4(), uuid.uuid4()
    await query(url, "INSERT INTO ledger_void_marks (id, marked_at) VALUES ($1, now() - interval '25 hours'),"
                     " ($2, now() - interval '23 hours')", old, new)
    assert await ledger.forget_void_marks() == 1
    assert [r["id"] for r in await query(url, "SELECT id FROM ledger_void_marks")] == [new]


async def test_a_replay_after_the_account_was_suspended_is_answered_replayed(env):
    """An admission committed whose reply was lost, tried again after its account was suspended
    in between: it was admitted, so it is 'replayed' (forwarded), not 'inactive', which left its
    entry pending for the sweeper to bill (migrations/0044). A new request is refused."""
    url, pool, ledger, sub, key = env
    reservation = Reservation(uuid.uuid4(), sub, key, "chat", "glm-4.6", 300, 1300, 1300)
    assert (await ledger.admit(reservation)).admitted
    await query(url, "UPDATE accounts SET suspended_at = now() WHERE id = (SELECT account_id FROM subscriptions"
                     " WHERE id = $1)", sub)
    fresh = Reservation(uuid.uuid4(), sub, key, "chat", "glm-4.6", 300, 1300, 1300)
    rows = await query(url, "SELECT * FROM ledger_admit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                       *_admit_arguments([reservation, fresh]), 60.0, [False, False])
    assert [(r["outcome"], r["detail"]) for r in rows] == [("replayed", None), ("inactive", "suspended")]
