"""The one ledger of migrations/0031, straight against PostgreSQL: credits (operations) and
top-ups / overage (billing) in the same transitions. Extra windows are counted in credits like
the plan's; the plan pays first; the room the bridge reads is in tokens; suspension and billing
states both refuse; extra windows are locked in id order with the plan's."""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import pytest

from bridge.ports import Reservation, Settlement
from service import db
from service.ledger import Ledger, Usage

from .conftest import new_plan, new_user, query

# a model priced at 2 / 0.5 / 3 credits per input / cached / output token on the test plan
COEFFS = (2, 0.5, 3)
# what the bridge asks for: a 100-token prompt estimate (proven bound 150) and max_tokens 200
PROMPT, BOUND, MAX_TOKENS = 100, 150, 200
# in credits: reserve = 100 x 2 + 200 x 3, hold = 150 x 2 + 200 x 3
RESERVE_CREDITS, HELD_CREDITS = 800, 900
# an answer of 100 prompt and 200 completion tokens: 100 x 2 + 200 x 3 credits
ANSWER = Usage(prompt_tokens=100, completion_tokens=200)
BILLED = 800


class Sub:
    def __init__(self, url: str, plan: str, sub: int, key: int, account: int) -> None:
        self.url, self.plan, self.id, self.key, self.account = url, plan, sub, key, account


async def _subscription(url: str, window: int, **plan_columns) -> Sub:
    plan = new_plan(url, window=window, **plan_columns)
    await query(url, "INSERT INTO plan_credits (plan_id, model, input_coeff, cached_coeff, output_coeff)"
                     " VALUES ($1, 'glm-4.6', $2, $3, $4)", plan, *COEFFS)
    new_user(url, plan)
    row = (await query(url, "SELECT s.id, s.account_id, k.id AS key FROM subscriptions s JOIN api_keys k"
                            " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan))[0]
    return Sub(url, plan, row["id"], row["key"], row["account_id"])


async def _topup(s: Sub, credits: int) -> int:
    """A block attached as billing attaches a bought one; returns its window."""
    topup = (await query(s.url, "INSERT INTO topups (account_id, tokens, amount, currency, expires_at,"
                                " stripe_checkout_session_id) VALUES ($1, $2, 0, 'usd', now() + interval '30 days',"
                                " 'cs_' || gen_random_uuid()) RETURNING id", s.account, credits))[0]["id"]
    return (await query(s.url, "SELECT billing_topup_attach($1) AS w", topup))[0]["w"]


def _ask(s: Sub, entry: uuid.UUID | None = None) -> Reservation:
    return Reservation(entry or uuid.uuid4(), s.id, s.key, "chat", "glm-4.6", PROMPT, PROMPT + MAX_TOKENS,
                       BOUND + MAX_TOKENS)


async def _windows(s: Sub) -> dict[str, asyncpg.Record]:
    return {r["kind"]: r for r in await query(s.url, "SELECT * FROM quota_windows WHERE subscription_id = $1"
                                                     " AND ends_at > now() ORDER BY id", s.id)}


async def _rows(s: Sub) -> list[asyncpg.Record]:
    return await query(s.url, "SELECT * FROM usage_ledger WHERE subscription_id = $1 ORDER BY created_at, id", s.id)


@pytest.fixture
async def ledger(fresh_database):
    pool = await db.create_pool(fresh_database, size=10)
    yield Ledger(pool, lease_seconds=60)
    await pool.close()


async def test_a_topup_pays_in_credits_only_what_the_plan_cannot_hold(fresh_database, ledger):
    s = await _subscription(fresh_database, window=10_000)
    block = await _topup(s, 5_000)
    # the room the bridge compares with its hold (tokens): the plan's room after this request plus
    # the block's, in credits, at the plan's dearest rate (3 credits an output token)
    first = await ledger.admit(_ask(s))
    assert first.admitted and first.room == (10_000 - HELD_CREDITS + 5_000) // 3
    entries = [(await _rows(s))[0]["id"]]
    await ledger.settle(Settlement(entries[0], "posted", ANSWER, False, "t", upstream="sim", upstream_cost=0.25))
    while True:
        admission = await ledger.admit(_ask(s, entry := uuid.uuid4()))
        if not admission.admitted:
            break
        entries.append(entry)
        assert await ledger.settle(Settlement(entry, "posted", ANSWER, False, "t", upstream="sim",
                                              upstream_cost=0.25)) == BILLED
    # 12 answers fit the plan, the 13th is split (400 credits held by the plan, 500 by the block),
    # then the block holds whole requests until 600 credits are left, less than a hold of 900
    assert (admission.outcome, admission.window_kind) == ("window_full", "5h")
    assert len(entries) == 18
    windows = await _windows(s)
    assert windows["5h"]["posted"] == windows["5h"]["allowance"] == 10_000
    assert windows["week"]["posted"] == 10_000
    assert (windows["topup"]["id"], windows["topup"]["posted"]) == (block, 18 * BILLED - 10_000)
    assert all(w["held"] == w["reserved"] == 0 for w in windows.values())
    rows = await _rows(s)
    assert [r["extra_kind"] for r in rows] == [None] * 12 + ["topup"] * 6
    split = rows[12]
    assert (split["held_tokens"], split["extra_held_tokens"], split["extra_billed_tokens"]) == (400, 500, 400)
    assert (split["reserved_tokens"], split["extra_reserved_tokens"]) == (400, RESERVE_CREDITS - 400)
    assert all((r["held_tokens"], r["extra_held_tokens"], r["extra_billed_tokens"]) == (0, HELD_CREDITS, BILLED)
               for r in rows[13:])
    assert sum(r["extra_billed_tokens"] for r in rows) == windows["topup"]["posted"]
    # exact tokens, credits at the coefficients fixed on the row, the upstream and its cost
    assert all((r["prompt_tokens"], r["completion_tokens"], r["billed_tokens"]) == (100, 200, BILLED) for r in rows)
    assert all((float(r["coeff_input"]), float(r["coeff_cached"]), float(r["coeff_output"])) == COEFFS for r in rows)
    assert all(r["upstream"] == "sim" and float(r["upstream_cost"]) == 0.25 for r in rows)
    # a change of the plan's allowances moves the plan's windows, never the block
    await query(s.url, "UPDATE plans SET window_tokens = 20000 WHERE id = $1", s.plan)
    await query(s.url, "SELECT plan_apply_allowances($1)", s.plan)
    windows = await _windows(s)
    assert (windows["5h"]["allowance"], windows["topup"]["allowance"]) == (20_000, 5_000)


async def test_our_own_numbers_are_capped_at_the_whole_hold_and_the_sweeper_bills_the_block(fresh_database, ledger):
    s = await _subscription(fresh_database, window=1_000)
    block = await _topup(s, 5_000)
    whole, split, swept = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert (await ledger.admit(_ask(s, whole))).admitted  # 900 of the plan's 1,000
    assert (await ledger.admit(_ask(s, split))).admitted  # 100 in the plan, 800 in the block
    # an estimate far above the hold bills the hold: the plan's part first, the block the rest
    huge = Usage(prompt_tokens=10_000, completion_tokens=10_000)
    assert await ledger.post(split, huge, estimated=True, reason="estimated") == HELD_CREDITS
    assert await ledger.void(whole, reason="refused upstream") == 0
    row = {r["id"]: r for r in await _rows(s)}[split]
    assert (row["billed_tokens"], row["extra_billed_tokens"]) == (HELD_CREDITS, 800)
    # the plan has 100 posted, 900 free again: the next request is the plan's alone
    assert (await ledger.admit(_ask(s, swept))).admitted
    await query(s.url, "UPDATE usage_ledger SET lease_until = now() - interval '1 second',"
                       " delivered_tokens = 50 WHERE id = $1", swept)
    assert await ledger.expire_due() == 1
    row = {r["id"]: r for r in await _rows(s)}[swept]
    # the prompt estimate and the delivered tokens, in credits: 100 x 2 + 50 x 3
    assert (row["state"], row["billed_tokens"], row["extra_kind"], row["upstream_cost"]) == ("expired", 350, None, None)
    windows = await _windows(s)
    assert (windows["5h"]["posted"], windows["topup"]["posted"]) == (100 + 350, 800)
    assert windows["topup"]["id"] == block
    assert all(w["held"] == w["reserved"] == 0 for w in windows.values())


async def test_overage_is_counted_and_metered_in_credits(fresh_database, ledger):
    s = await _subscription(fresh_database, window=1_000)
    await query(s.url, "UPDATE plans SET overage_cap_tokens = 2000 WHERE id = $1", s.plan)
    await query(s.url, "UPDATE accounts SET stripe_customer_id = 'cus_credits' WHERE id = $1", s.account)
    await query(s.url, "INSERT INTO stripe_subscriptions (stripe_subscription_id, account_id, stripe_customer_id,"
                       " status, plan_id, current_period_start, current_period_end, has_overage_item, subscription_id)"
                       " VALUES ('sub_credits', $1, 'cus_credits', 'active', $2, now() - interval '1 day',"
                       " now() + interval '29 days', true, $3)", s.account, s.plan, s.id)
    statuses = []
    for _ in range(5):
        admission = await ledger.admit(_ask(s, entry := uuid.uuid4()))
        statuses.append(admission.outcome)
        if admission.admitted:
            await ledger.post(entry, ANSWER, estimated=False, reason="t")
    # 800 in the plan; 200 in the plan and 600 overage; 800 overage; then 600 left, under a hold of 900
    assert statuses == ["admitted"] * 3 + ["window_full"] * 2
    windows = await _windows(s)
    assert (windows["5h"]["posted"], windows["overage"]["allowance"], windows["overage"]["posted"]) == (1_000, 2_000, 1_400)
    rows = await _rows(s)
    assert [r["extra_kind"] for r in rows] == [None, "overage", "overage"]
    assert sum(r["extra_billed_tokens"] for r in rows) == 1_400
    metered = await query(s.url, "SELECT sum(value)::bigint AS v FROM meter_outbox WHERE stripe_customer_id = 'cus_credits'")
    assert metered[0]["v"] == 1_400


async def test_a_suspended_account_and_a_billing_state_are_both_refused(fresh_database, ledger):
    s = await _subscription(fresh_database, window=10_000)
    await query(s.url, "UPDATE accounts SET suspended_at = now() WHERE id = $1", s.account)
    refused = await ledger.admit(_ask(s))
    assert (refused.outcome, refused.detail) == ("inactive", "suspended")
    await query(s.url, "UPDATE accounts SET suspended_at = NULL WHERE id = $1", s.account)
    await query(s.url, "UPDATE subscriptions SET status = 'past_due' WHERE id = $1", s.id)
    await query(s.url, "INSERT INTO stripe_subscriptions (stripe_subscription_id, account_id, stripe_customer_id,"
                       " status, subscription_id) VALUES ('sub_unpaid', $1, 'cus_unpaid', 'unpaid', $2)",
                s.account, s.id)
    refused = await ledger.admit(_ask(s))
    assert (refused.outcome, refused.detail) == ("inactive", "unpaid")  # Stripe's word for it
    await query(s.url, "UPDATE subscriptions SET status = 'active' WHERE id = $1", s.id)
    assert (await ledger.admit(_ask(s))).admitted
    assert len(await _rows(s)) == 1


async def test_admission_locks_extra_windows_in_id_order_with_the_plans(fresh_database, ledger):
    """A block bought before the plan's windows opened has the lowest id: an admission takes it
    before the weekly and 5-hour windows, even when the plan holds the whole request."""
    s = await _subscription(fresh_database, window=10_000)
    block = await _topup(s, 5_000)
    first = uuid.uuid4()
    assert (await ledger.admit(_ask(s, first))).admitted
    await ledger.post(first, ANSWER, estimated=False, reason="t")
    windows = await _windows(s)
    assert block < windows["week"]["id"] < windows["5h"]["id"]

    holder = await asyncpg.connect(s.url)
    prober = await asyncpg.connect(s.url)
    try:
        async with holder.transaction():
            # someone holds the 5-hour window, the last in id order
            await holder.execute("SELECT 1 FROM quota_windows WHERE id = $1 FOR NO KEY UPDATE", windows["5h"]["id"])
            admission = asyncio.ensure_future(ledger.admit(_ask(s)))
            for _ in range(600):
                waiting = await prober.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND (query LIKE '%ledger_admit_batch%' OR query LIKE '%ledger_tick%')"
                    " AND datname = current_database()")
                if waiting:
                    break
                await asyncio.sleep(0.05)
            assert waiting, "the admission never waited for the 5-hour window"
            # it waits there holding the block and the weekly window, taken before in id order
            for earlier in (block, windows["week"]["id"]):
                with pytest.raises(asyncpg.LockNotAvailableError):
                    async with prober.transaction():
                        await prober.execute("SELECT 1 FROM quota_windows WHERE id = $1 FOR NO KEY UPDATE NOWAIT",
                                             earlier)
        assert (await asyncio.wait_for(admission, 60)).admitted
    finally:
        await holder.close()
        await prober.close()
    assert (await _windows(s))["topup"]["held"] == 0  # the plan held it; the block was only locked


@pytest.mark.parametrize("binding", ["5h", "week"])
async def test_a_refused_plan_only_request_keeps_its_place_before_the_next_one(fresh_database, ledger, binding):
    # The ticker marks first tries plan-only while settlements of their subscription wait
    # (migrations/0041) and tries a refused one again after them. Two in one batch: the larger is
    # refused while the previous request's hold is still on the plan; the smaller must not take
    # the plan's room meanwhile (0042), or on the retry, settled first, the larger spills onto the
    # top-up where the plan would have held it whole.
    s = await (_subscription(fresh_database, window=2_350) if binding == "5h" else
               _subscription(fresh_database, window=10**6, weekly=2_350))
    block = await _topup(s, 5_000)
    first = uuid.uuid4()
    assert (await ledger.admit(_ask(s, first))).admitted  # holds 900 credits: 1,450 left
    big = Reservation(uuid.uuid4(), s.id, s.key, "chat", "glm-4.6", PROMPT, PROMPT + 400, BOUND + 400)  # 1,500
    small = _ask(s)  # 900
    _, tried = await ledger._tick([], [big, small], [True, True])
    assert [(a.outcome, a.window_kind) for a in tried] == [("window_full", binding)] * 2
    assert tried[1].resets_at == tried[0].resets_at  # refused as the one before it was
    assert [r["id"] for r in await _rows(s)] == [first]
    # the retry: the settlement first (800 billed: 1,550 left), then both in arrival order
    settled = Settlement(first, "posted", ANSWER, False, "t", subscription_id=s.id)
    billed, retried = await ledger._tick([settled], [big, small], [False, False])
    assert billed == [BILLED] and all(a.admitted for a in retried)
    rows = {r["id"]: r for r in await _rows(s)}
    assert (rows[big.entry_id]["held_tokens"], rows[big.entry_id]["extra_window_id"]) == (1_500, None)
    assert (rows[small.entry_id]["held_tokens"], rows[small.entry_id]["extra_window_id"]) == (50, block)
    assert rows[small.entry_id]["extra_held_tokens"] == 850


class _Undone(Exception):
    pass


async def test_admission_locks_existing_mutexes_before_it_makes_a_new_one(fresh_database, ledger):
    # A tick of admissions alone calls ledger_admit_batch directly (service/ledger.py), and
    # ledger_tick in another process locks the existing flight rows before admission makes a new
    # subscription's. Made first and waiting for an existing one, a new row would close a cycle
    # with such a tick (0042): while the admission waits for an existing mutex it holds no new one.
    old, new = await _subscription(fresh_database, window=10**9), await _subscription(fresh_database, window=10**9)
    # every subscription has its flight row from its creation (0042's trigger); this test is of
    # the fallback for one that is missing all the same
    await query(new.url, "DELETE FROM subscription_flights WHERE subscription_id = $1", new.id)
    assert not await query(new.url, "SELECT 1 FROM subscription_flights WHERE subscription_id = $1", new.id)
    assert (await ledger.admit(_ask(old))).admitted
    holder = await asyncpg.connect(old.url)
    prober = await asyncpg.connect(old.url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM subscription_flights WHERE subscription_id = $1 FOR NO KEY UPDATE",
                                 old.id)
            batch = asyncio.ensure_future(ledger._tick([], [_ask(old), _ask(new)], [False, False]))
            for _ in range(600):
                if await prober.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                         " AND query LIKE '%ledger_admit_batch%' AND datname = current_database()"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the admission never waited for the old subscription's mutex")
            with pytest.raises(_Undone):
                async with prober.transaction():  # the new row is not made (nor held) yet: no wait
                    await prober.execute("SET LOCAL lock_timeout = '500ms'")
                    await prober.execute("INSERT INTO subscription_flights (subscription_id) VALUES ($1)"
                                         " ON CONFLICT DO NOTHING", new.id)
                    raise _Undone()  # rolled back: the row is the admission's to make
        _, admissions = await asyncio.wait_for(batch, 60)
        assert all(a.admitted for a in admissions)
    finally:
        await holder.close()
        await prober.close()


async def test_a_subscription_has_its_flight_row_from_its_creation(fresh_database):
    s = await _subscription(fresh_database, window=10_000)
    rows = await query(s.url, "SELECT in_flight FROM subscription_flights WHERE subscription_id = $1", s.id)
    assert [r["in_flight"] for r in rows] == [0]


async def test_overage_of_a_period_is_metered_in_that_period_when_its_request_outlives_it(fresh_database):
    """A request admitted on one Stripe period's overage window, settled after that period ended
    (a long stream at the renewal): its overage is stamped inside its own period, and a minute's
    outbox row never holds two periods' usage (migrations/0047)."""
    plan = new_plan(fresh_database, 10_000, 1_000_000)
    new_user(fresh_database, plan)
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute("UPDATE plans SET overage_cap_tokens = 100000 WHERE id = $1", plan)
        account, sub, key = await conn.fetchrow(
            "SELECT s.account_id, s.id, k.id FROM subscriptions s JOIN api_keys k ON k.account_id = s.account_id"
            " WHERE s.plan_id = $1", plan)
        await conn.execute("UPDATE accounts SET stripe_customer_id = 'cus_boundary' WHERE id = $1", account)
        # Stripe's mirror: active, metered overage item, a period that ends in 2 seconds
        start, end = await conn.fetchrow(
            "INSERT INTO stripe_subscriptions (stripe_subscription_id, account_id, stripe_customer_id, status,"
            " plan_id, current_period_start, current_period_end, has_overage_item, subscription_id)"
            " VALUES ('sub_boundary', $1, 'cus_boundary', 'active', $2, now() - interval '30 days',"
            " now() + interval '2 seconds', true, $3) RETURNING current_period_start, current_period_end",
            account, plan, sub)

        async def admit_and_run() -> uuid.UUID:
            entry = uuid.uuid4()
            row = await conn.fetchrow(
                "SELECT * FROM ledger_admit($1, $2, $3, 'chat', 'glm-4.6', 100, 5000, 5000, 60)", entry, sub, key)
            assert row["outcome"] == "admitted", dict(row)
            return entry

        spent = uuid.uuid4()  # the plan's 5-hour window spent down to 1,000
        await conn.fetch("SELECT * FROM ledger_admit($1, $2, $3, 'chat', 'glm-4.6', 100, 9000, 9000, 60)", spent, sub, key)
        await conn.fetch("SELECT * FROM ledger_settle($1, 'posted', 100, 8900, 0, 0, false, 'done', NULL)", spent)
        old = await admit_and_run()  # on period N's overage window
        await asyncio.sleep(2.5)  # it streams on past the period's end
        # Stripe renews: period N+1, and a request on its own overage window
        await conn.execute("UPDATE stripe_subscriptions SET current_period_start = $1::timestamptz,"
                           " current_period_end = $1 + interval '30 days' WHERE stripe_subscription_id = 'sub_boundary'",
                           end)
        new = await admit_and_run()
        for entry in (old, new):  # both settle now, after the renewal, each 2,100 beyond the plan
            await conn.fetch("SELECT * FROM ledger_settle($1, 'posted', 100, 3000, 0, 0, false, 'done', NULL)", entry)
        rows = await conn.fetch("SELECT value, last_at, period_start FROM meter_outbox"
                                " WHERE stripe_customer_id = 'cus_boundary' ORDER BY period_start")
        windows = await conn.fetch("SELECT starts_at, ends_at, posted FROM quota_windows"
                                   " WHERE subscription_id = $1 AND kind = 'overage' ORDER BY starts_at", sub)
        assert [(w["starts_at"], w["ends_at"]) for w in windows] == [(start, end), (end, end + dt.timedelta(days=30))]
        # 3,100 each: the first on the plan's last 1,000 and its period's window, the second (the
        # plan's 1,000 held by the first when it came) all on its own period's window
        assert [w["posted"] for w in windows] == [2100, 3100]
        assert [r["period_start"] for r in rows] == [start, end]
        assert [r["value"] for r in rows] == [w["posted"] for w in windows]
        assert start <= rows[0]["last_at"] < end <= rows[1]["last_at"]
    finally:
        await conn.close()
