"""Metering edges against the real ledger (embedded PostgreSQL): what an upstream reports above
the hold, counts near int4's range, coefficient bounds, a plan override's peak multiplier, peak
hours with equal ends."""
from __future__ import annotations

import logging
import uuid

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from bridge.ports import Reservation, Settlement
from service import config as config_module
from service import db, usage
from service.admin import plans as admin_plans
from service.admin import reports
from service.ledger import Ledger, Usage

from .conftest import database_before, new_plan, new_user, query


class Sub:
    def __init__(self, url, plan, sub, key, account):
        self.url, self.plan, self.id, self.key, self.account = url, plan, sub, key, account


async def _subscription(url: str, window: int, weekly: int | None = None) -> Sub:
    plan = new_plan(url, window=window, weekly=weekly)
    new_user(url, plan)
    row = (await query(url, "SELECT s.id, s.account_id, k.id AS key FROM subscriptions s JOIN api_keys k"
                            " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan))[0]
    return Sub(url, plan, row["id"], row["key"], row["account_id"])


def _ask(s: Sub, prompt=100, max_tokens=200, bound=150, model="glm-4.6") -> Reservation:
    """Reserves prompt + max_tokens, holds bound + max_tokens (credits, at coefficients 1)."""
    return Reservation(uuid.uuid4(), s.id, s.key, "chat", model, prompt, prompt + max_tokens, bound + max_tokens)


async def _entry(s: Sub):
    return (await query(s.url, "SELECT id FROM usage_ledger WHERE subscription_id = $1 AND state = 'pending'"
                               " ORDER BY created_at DESC LIMIT 1", s.id))[0]["id"]


async def _windows(s: Sub):
    return {r["kind"]: r for r in await query(s.url, "SELECT * FROM quota_windows WHERE subscription_id = $1"
                                                     " AND ends_at > now() ORDER BY id", s.id)}


async def _peak_now(url: str) -> None:
    await query(url, "UPDATE credit_settings SET peak_zone = 'UTC',"
                     " peak_start = ((now() AT TIME ZONE 'UTC') - interval '1 hour')::time,"
                     " peak_end = ((now() AT TIME ZONE 'UTC') + interval '1 hour')::time")
    assert (await query(url, "SELECT credit_peak_now() AS p"))[0]["p"]


@pytest.fixture
async def pool(fresh_database):
    p = await db.create_pool(fresh_database, size=6)
    yield p
    await p.close()


@pytest.fixture
def ledger(pool):
    return Ledger(pool, lease_seconds=60)


# ---- 1. the upstream's numbers are billed at most the hold -----------------------------------

async def test_usage_reported_above_the_hold_is_billed_at_the_hold_and_logged(fresh_database, ledger, caplog):
    s = await _subscription(fresh_database, window=1_000)
    assert (await ledger.admit(_ask(s))).admitted  # holds 350 credits
    entry = await _entry(s)
    with caplog.at_level(logging.WARNING, logger="codeplan.ledger"):
        billed = await ledger.settle(Settlement(entry, "posted", Usage(prompt_tokens=100, completion_tokens=5_000),
                                                False, "t"))
    assert billed == 350
    w = await _windows(s)
    assert (w["5h"]["posted"], w["5h"]["held"], w["week"]["posted"]) == (350, 0, 350)
    row = (await query(s.url, "SELECT * FROM usage_ledger WHERE id = $1", entry))[0]
    # the upstream's counts are kept exactly; only the bill stops at the hold
    assert (row["prompt_tokens"], row["completion_tokens"], row["billed_tokens"], row["estimated"]) == (
        100, 5_000, 350, False)
    # the excess is the operator's to take up with the upstream: named in the service's log
    warned = [(r.entry, r.unbilled_credits) for r in caplog.records
              if r.name == "codeplan.ledger" and r.getMessage() == "usage reported above the hold was not billed"]
    assert warned == [(str(entry), 4_750)]
    # and the migration's SQL finds the row
    header = (db.MIGRATIONS_DIR / "0049_metering_edges.sql").read_text().partition("finds them all with:")[2]
    sql = "\n".join(line.removeprefix("--") for line in header.partition(";")[0].splitlines())
    assert [r["id"] for r in await query(s.url, sql)] == [entry]


async def test_the_tick_of_settlements_and_admissions_passes_the_unbilled_credits_on(fresh_database, ledger, caplog):
    # a settlement and an admission in one tick go through ledger_tick, not ledger_settle_batch
    s = await _subscription(fresh_database, window=10_000)
    assert (await ledger.admit(_ask(s))).admitted
    entry = await _entry(s)
    with caplog.at_level(logging.WARNING, logger="codeplan.ledger"):
        billed, admissions = await ledger._tick(
            [Settlement(entry, "posted", Usage(prompt_tokens=100, completion_tokens=1_000), False, "t")],
            [_ask(s)], [False])
    assert billed == [350] and admissions[0].admitted
    assert [(r.entry, r.unbilled_credits) for r in caplog.records if r.name == "codeplan.ledger"
            and r.getMessage() == "usage reported above the hold was not billed"] == [(str(entry), 750)]


async def test_usage_reported_above_the_hold_does_not_overdraw_a_topup(fresh_database, ledger):
    s = await _subscription(fresh_database, window=1_000)
    topup = (await query(s.url, "INSERT INTO topups (account_id, tokens, amount, currency, expires_at,"
                                " stripe_checkout_session_id) VALUES ($1, 500, 0, 'usd', now() + interval '30 days',"
                                " 'cs_' || gen_random_uuid()) RETURNING id", s.account))[0]["id"]
    await query(s.url, "SELECT billing_topup_attach($1)", topup)
    assert (await ledger.admit(_ask(s, prompt=100, max_tokens=600, bound=100))).admitted  # holds 700
    await ledger.settle(Settlement(await _entry(s), "posted", Usage(prompt_tokens=100, completion_tokens=600),
                                   False, "t"))
    assert (await ledger.admit(_ask(s, prompt=100, max_tokens=400, bound=100))).admitted  # 300 plan + 200 block
    billed = await ledger.settle(Settlement(await _entry(s), "posted",
                                            Usage(prompt_tokens=100, completion_tokens=9_000), False, "t"))
    w = await _windows(s)
    assert billed == 500
    assert (w["5h"]["posted"], w["topup"]["posted"]) == (1_000, 200)


async def test_our_own_numbers_below_the_hold_are_billed_as_counted(fresh_database, ledger):
    # the cap changes nothing within the hold, the upstream's numbers or ours
    s = await _subscription(fresh_database, window=1_000)
    for estimated in (False, True):
        assert (await ledger.admit(_ask(s))).admitted
        billed = await ledger.settle(Settlement(await _entry(s), "posted",
                                                Usage(prompt_tokens=90, completion_tokens=40), estimated, "t"))
        assert billed == 130


# ---- 2. per-row sums of int4 counts are widened first ----------------------------------------

async def test_counts_near_int4s_range_are_shown_by_the_usage_endpoints_and_the_top_report(
        fresh_database, ledger, pool):
    s = await _subscription(fresh_database, window=10**13)
    assert (await ledger.admit(_ask(s))).admitted
    await ledger.settle(Settlement(await _entry(s), "posted", Usage(prompt_tokens=2_000_000_000,
                                                                    completion_tokens=200_000_000), False, "t"))
    # /v1/usage, /api/monitor/usage/quota/limit, the web page and live usage all read this
    _, windows = await usage.current_windows(pool, s.id)
    assert {w.kind: w.tokens for w in windows} == {"5h": 2_200_000_000, "week": 2_200_000_000}
    top = await pool.fetch(reports._TOP_SQL, 5, 20)
    assert [r["tokens"] for r in top] == [2_200_000_000]


# ---- 3. coefficient x peak multiplier always fits the ledger's columns -----------------------

async def test_the_largest_coefficient_at_the_largest_multiplier_is_admitted_at_peak(fresh_database, ledger):
    from service.credits import MAX_COEFFICIENT, MAX_PEAK_MULTIPLIER
    s = await _subscription(fresh_database, window=10**15)
    await query(s.url, "INSERT INTO plan_credits (plan_id, model, input_coeff, cached_coeff, output_coeff,"
                       " peak_multiplier) VALUES ($1, 'glm-4.6', $2, $2, $2, $3)", s.plan,
                MAX_COEFFICIENT, MAX_PEAK_MULTIPLIER)
    await _peak_now(s.url)
    assert (await ledger.admit(_ask(s))).admitted
    row = (await query(s.url, "SELECT coeff_input, coeff_output FROM usage_ledger WHERE subscription_id = $1",
                       s.id))[0]
    assert (float(row["coeff_input"]), float(row["coeff_output"])) == (999_900, 999_900)


def _put_credits(body: dict):
    app = Litestar(route_handlers=[admin_plans.set_plan_credits])
    with TestClient(app) as client:
        return client.put("/plans/pro/credits/glm-4.6", json=body)


@pytest.mark.parametrize("body", [
    {"input": 10_000, "cached": 1, "output": 1},
    {"input": 1, "cached": 10_000, "output": 1},
    {"input": 1, "cached": 1, "output": 100_000},
    {"input": 1, "cached": 1, "output": 1, "peak_multiplier": 101},
])
def test_the_admin_api_refuses_coefficients_that_could_overflow_at_peak(body):
    # refused before the handler runs (it would need a database): a 400, never a 500
    answer = _put_credits(body)
    assert answer.status_code == 400, answer.text


@pytest.mark.parametrize("credits, named", [
    ("{ input = 10000 }", "input"), ("{ output = 20000.5 }", "output"), ("{ cached = 99999 }", "cached"),
    ("{ peak_multiplier = 101 }", "peak_multiplier"),
])
def test_a_models_file_with_coefficients_that_could_overflow_stops_start_up_with_one_line(tmp_path, credits, named):
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nid = "glm-9"\ncontext_window = 1000\nmax_output = 100\ncredits = {credits}\n')
    with pytest.raises(config_module.ConfigError) as raised:
        config_module.load({"CODEPLAN_MODELS_FILE": str(path)})
    message = str(raised.value)
    assert message.startswith("CODEPLAN_MODELS_FILE:") and named in message and "\n" not in message
    path.write_text('[[models]]\nid = "glm-9"\ncontext_window = 1000\nmax_output = 100\n'
                    'credits = { input = 9999, cached = 9999, output = 9999, peak_multiplier = 100 }\n')
    config_module.load({"CODEPLAN_MODELS_FILE": str(path)})


# ---- 4. a plan's override inherits the model's peak multiplier -------------------------------

async def test_a_plan_override_without_a_multiplier_inherits_the_models(fresh_database, ledger):
    s = await _subscription(fresh_database, window=10**9)
    await query(s.url, "UPDATE model_credits SET peak_multiplier = 3 WHERE model = 'glm-4.6'")
    # what PUT /admin/plans/{plan}/credits/glm-4.6 writes when peak_multiplier is left out
    change = msgspec.json.decode(b'{"input": 1, "cached": 0.2, "output": 2}', type=admin_plans.CreditChange)
    assert change.peak_multiplier is None
    await query(s.url, "INSERT INTO plan_credits (plan_id, model, input_coeff, cached_coeff, output_coeff,"
                       " peak_multiplier) VALUES ($1, 'glm-4.6', $2, $3, $4, $5)", s.plan,
                change.input, change.cached, change.output, change.peak_multiplier)
    await _peak_now(s.url)
    assert (await ledger.admit(_ask(s))).admitted
    row = (await query(s.url, "SELECT coeff_input, coeff_output FROM usage_ledger WHERE subscription_id = $1",
                       s.id))[0]
    assert (float(row["coeff_input"]), float(row["coeff_output"])) == (3, 6)


async def test_overrides_migration_0030_made_inherit_and_those_an_admin_wrote_keep_theirs(pg_url, tmp_path):
    # the database as it stood before 0049, with both kinds of override holding 1
    url = await database_before(pg_url, tmp_path, "0049")
    for plan in ("copied", "admin"):
        await query(url, "INSERT INTO plans (id, name, window_tokens, weekly_tokens, cached_weight,"
                         " monthly_price_cents, models) VALUES ($1, $1, 1000, 5000, 0.3, 0, ARRAY['glm-4.6'])", plan)
        await query(url, "INSERT INTO plan_credits (plan_id, model, input_coeff, cached_coeff, output_coeff)"
                         " VALUES ($1, 'glm-4.6', 1, 0.3, 1)", plan)
    await query(url, "INSERT INTO admin_audit (actor, action, target, before, after) VALUES"
                     " ('admin', 'plan.credits', 'plan:admin/glm-4.6', NULL, '{}')")
    await db.migrate(url)
    rows = {r["plan_id"]: r["peak_multiplier"] for r in await query(url, "SELECT * FROM plan_credits")}
    assert rows["copied"] is None and float(rows["admin"]) == 1


# ---- 5. peak hours with equal ends -----------------------------------------------------------

@pytest.mark.parametrize("hours", ["14:00-14:00", " 09:30 - 09:30 ", "00:30-00:30"])
def test_peak_hours_with_equal_ends_stop_start_up_with_one_line(hours):
    with pytest.raises(config_module.ConfigError) as raised:
        config_module.load({"CODEPLAN_PEAK_HOURS": hours})
    message = str(raised.value)
    assert message.startswith("CODEPLAN_PEAK_HOURS:") and "equal" in message and "\n" not in message
    assert "00:00-00:00" in message  # it says how to write all day
    config_module.load({"CODEPLAN_PEAK_HOURS": "22:00-02:00"})  # over midnight: still fine
    config_module.load({"CODEPLAN_PEAK_HOURS": "00:00-00:00"})  # all day, as it always was


async def test_a_days_costs_the_ledger_accepted_roll_up(fresh_database):
    """Each row's cost is below 1e9 USD (service/ledger.py `_usd`), but a day's sum of several
    went into usage_daily's numeric(18,9) too: the rollup, one statement, then failed on every
    run and rolled up nothing (migrations/0051 widens the daily column)."""
    import datetime as dt

    from bridge.ports import Counts

    url = fresh_database
    plan = new_plan(url, window=10**12, weekly=10**12)
    new_user(url, plan)
    row = (await query(url, "SELECT s.id, k.id AS key FROM subscriptions s JOIN api_keys k"
                            " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan))[0]
    pool = await db.create_pool(url, size=2)
    try:
        ledger = Ledger(pool, lease_seconds=60)
        for _ in range(3):
            r = Reservation(uuid.uuid4(), row["id"], row["key"], "chat", "glm-4.6", 1, 10, 10)
            assert (await ledger.admit(r)).admitted
            # within the bounds: 2^31-1 tokens at the highest price (100,000 USD per million)
            await ledger.settle(Settlement(r.entry_id, "posted", Counts(prompt_tokens=5, completion_tokens=5),
                                           False, "t", upstream="u", upstream_cost=4.0e8,
                                           subscription_id=row["id"]))
        await query(url, "UPDATE usage_ledger SET created_at = date_trunc('day', now(), 'UTC') - interval '10 days'"
                         " WHERE subscription_id = $1", row["id"])
        assert await ledger.rollup(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=8)) == 3
        daily = await query(url, "SELECT upstream_cost FROM usage_daily WHERE subscription_id = $1", row["id"])
        assert [float(d["upstream_cost"]) for d in daily] == [1.2e9]
    finally:
        await pool.close()
