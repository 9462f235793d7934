"""Admission past the plan (migrations/0055, found by a hunt, each proven): an "unlimited" plan is
served, whatever its models cost (its room in tokens passed a bigint, and every admission of the
plan failed: a 503 on every request); a request the plan and one extra window can hold together
is admitted (README "Beyond the plan"), and too_large is the answer only for one that no extra
window could ever hold the rest of. The admin API bounds allowances at 2^53 - 1."""
from __future__ import annotations

import uuid

import httpx
import pytest

from bridge.ports import Reservation
from service import db
from service.admin.plans import MAX_CREDITS
from service.ledger import Ledger

from .conftest import new_plan, new_user, query, run, settled_query, start_bridge

ADMIN = "admission-mends-admin-" + "z" * 24
BIGINT = 2**63 - 1


@pytest.fixture(scope="module")
def srv(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_ADMIN_TOKEN=ADMIN)
    yield server
    server.stop()


def _admin(srv, method: str, path: str, body: dict) -> httpx.Response:
    return httpx.request(method, srv.url + "/admin" + path, json=body, timeout=30,
                         headers={"authorization": f"Bearer {ADMIN}"})


def _chat(srv, key: str, max_tokens: int) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "max_tokens": max_tokens, "messages": [
                          {"role": "user", "content": f"[[sim tool=none tokens=20 reasoning=0]] {uuid.uuid4().hex[:8]}"}]})


def _account(database: str, key: str) -> tuple[int, int]:
    """(subscription, account) of a user's key."""
    row = run(query(database, "SELECT s.id, s.account_id FROM api_keys k JOIN subscriptions s"
                              " ON s.account_id = k.account_id WHERE k.prefix = $1", key[:10]))[0]
    return row["id"], row["account_id"]


async def _topup(url: str, account: int, credits: int) -> int:
    """A block attached as billing attaches a bought one; returns its window."""
    topup = (await query(url, "INSERT INTO topups (account_id, tokens, amount, currency, expires_at,"
                              " stripe_checkout_session_id) VALUES ($1, $2, 0, 'usd', now() + interval '30 days',"
                              " 'cs_' || gen_random_uuid()) RETURNING id", account, credits))[0]["id"]
    return (await query(url, "SELECT billing_topup_attach($1) AS w", topup))[0]["w"]


# ---- an "unlimited" plan -------------------------------------------------------------------------

@pytest.mark.parametrize("made_by, allowance, coefficients, block", [
    # what an operator makes now: the admin API's largest allowance, a model given away free
    ("api", MAX_CREDITS, (0, 0, 0), None),
    # plans stored before the bound (or by hand): the hunter's 2^62 at a quarter of a credit a
    # token, and a bigint's largest with a top-up beside it (the two rooms' sum passed 2^63)
    ("sql", 2**62, (0.25, 0.1, 0.25), None),
    ("sql", BIGINT, (1, 0.2, 1), 100_000),
], ids=["api-max-free-model", "sql-2e62-discount", "sql-bigint-with-topup"])
def test_an_unlimited_plan_is_served(srv, database, made_by, allowance, coefficients, block):
    """Its room in tokens (the room in credits over the dearest rate) was assigned to a bigint:
    past 2^63, every admission of the plan failed, was tried again alone, failed the same, and
    its client was told the database could not be reached (503), on every request."""
    plan = "unl_" + uuid.uuid4().hex[:8]
    if made_by == "api":
        made = _admin(srv, "POST", "/plans", {"id": plan, "name": "Unlimited", "window_credits": allowance,
                                              "weekly_credits": allowance, "monthly_price_cents": 0,
                                              "models": ["glm-4.6"]})
        assert made.status_code == 201, made.text
        priced = _admin(srv, "PUT", f"/plans/{plan}/credits/glm-4.6",
                        dict(zip(("input", "cached", "output"), coefficients)))
        assert priced.status_code == 200, priced.text
    else:
        plan = new_plan(database, window=allowance, weekly=allowance)
        run(query(database, "UPDATE plans SET models = ARRAY['glm-4.6'] WHERE id = $1", plan))
        run(query(database, "INSERT INTO plan_credits (plan_id, model, input_coeff, cached_coeff, output_coeff)"
                            " VALUES ($1, 'glm-4.6', $2, $3, $4)", plan, *coefficients))
    key = new_user(database, plan)
    sub, account = _account(database, key)
    if block:
        run(_topup(database, account, block))

    for _ in range(2):  # the first opens the windows, the next finds them open
        answer = _chat(srv, key, 300)
        assert answer.status_code == 200, answer.text[:400]
    rows = settled_query(database, "SELECT * FROM usage_ledger WHERE subscription_id = $1", sub)
    assert [r["state"] for r in rows] == ["posted", "posted"]
    assert all(r["extra_window_id"] is None for r in rows)  # the plan holds it all
    windows = run(query(database, "SELECT * FROM quota_windows WHERE subscription_id = $1"
                                  " AND kind IN ('5h', 'week')", sub))
    billed = sum(r["billed_tokens"] for r in rows)
    assert sorted((w["kind"], w["allowance"], w["posted"], w["held"]) for w in windows) == [
        ("5h", allowance, billed, 0), ("week", allowance, billed, 0)]
    usage = httpx.get(srv.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert usage.status_code == 200, usage.text
    assert {w["kind"]: w["allowance"] for w in usage.json()["windows"]} == {"5h": allowance, "week": allowance}


@pytest.mark.parametrize("field", ["window_credits", "weekly_credits"])
def test_the_admin_api_bounds_allowances_at_2_to_the_53(srv, field):
    """Past 2^53 - 1 no browser reads the number exactly; the 400 says the bound."""
    plan = "big_" + uuid.uuid4().hex[:8]
    body = {"id": plan, "name": "Big", "window_credits": 1_000, "weekly_credits": 5_000,
            "monthly_price_cents": 0, "models": ["glm-4.6"]}
    refused = _admin(srv, "POST", "/plans", {**body, field: MAX_CREDITS + 1})
    assert refused.status_code == 400, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert str(MAX_CREDITS) in refused.text and field in refused.text
    assert _admin(srv, "POST", "/plans", body).status_code == 201
    refused = _admin(srv, "PATCH", f"/plans/{plan}", {field: 2**53})
    assert refused.status_code == 400 and str(MAX_CREDITS) in refused.text, refused.text
    changed = _admin(srv, "PATCH", f"/plans/{plan}", {field: MAX_CREDITS})
    assert changed.status_code == 200 and changed.json()[field] == MAX_CREDITS, changed.text


# ---- too large: past the plan and the largest extra window ---------------------------------------

def test_a_request_the_plan_and_a_topup_hold_together_is_served(srv, database):
    """A fresh 5-hour window of 1,000 credits and a block of 5,000: a request holding ~3,000 is
    served, the plan holding its 1,000 and the block the rest (it was a 400, "more tokens than
    the whole 5 hour window allows", with the block untouched); one holding ~8,000 fits in
    neither and is too large."""
    plan = new_plan(database, window=1_000, weekly=100_000)
    key = new_user(database, plan)
    sub, account = _account(database, key)
    block = run(_topup(database, account, 5_000))

    served = _chat(srv, key, 3_000)
    assert served.status_code == 200, served.text[:400]
    [row] = settled_query(database, "SELECT * FROM usage_ledger WHERE subscription_id = $1", sub)
    assert (row["state"], row["held_tokens"], row["extra_window_id"], row["extra_kind"]) == (
        "posted", 1_000, block, "topup")
    assert row["extra_held_tokens"] > 2_000  # the rest of the hold, prompt and max_tokens
    assert row["extra_billed_tokens"] == 0  # the plan pays first: a short answer is all the plan's

    refused = _chat(srv, key, 8_000)
    assert refused.status_code == 400, refused.text[:400]
    assert refused.json()["error"]["param"] == "max_tokens"
    # in the unit the allowance is kept in, and saying a top-up was counted too (it said
    # "tokens", and nothing of the block)
    assert "(1000 credits) and any top-up can hold" in refused.json()["error"]["message"]
    assert len(run(query(database, "SELECT 1 FROM usage_ledger WHERE subscription_id = $1", sub))) == 1


class Sub:
    def __init__(self, url: str, plan: str, sub: int, key: int, account: int) -> None:
        self.url, self.plan, self.id, self.key, self.account = url, plan, sub, key, account


async def _subscription(url: str, window: int, weekly: int) -> Sub:
    plan = new_plan(url, window=window, weekly=weekly)
    new_user(url, plan)
    row = (await query(url, "SELECT s.id, s.account_id, k.id AS key FROM subscriptions s JOIN api_keys k"
                            " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan))[0]
    return Sub(url, plan, row["id"], row["key"], row["account_id"])


def _ask(s: Sub, credits: int, entry: uuid.UUID | None = None) -> Reservation:
    """A request holding `credits` at the default coefficients (1 / 0.2 / 1): its prompt half of
    it (bound as estimated), its max_tokens the other half."""
    prompt = credits // 2
    return Reservation(entry or uuid.uuid4(), s.id, s.key, "chat", "glm-4.6", prompt, credits, credits)


@pytest.fixture
async def ledger(fresh_database):
    pool = await db.create_pool(fresh_database, size=4)
    yield Ledger(pool, lease_seconds=60)
    await pool.close()


@pytest.mark.parametrize("window, weekly, kind", [(1_000, 100_000, "5h"), (100_000, 1_000, "week")])
async def test_too_large_only_past_the_plan_and_the_largest_extra_window(fresh_database, ledger, window, weekly, kind):
    s = await _subscription(fresh_database, window, weekly)
    small = await _topup(fresh_database, s.account, 100)
    refused = await ledger.admit(_ask(s, 1_500))  # 500 past the plan: more than 100
    assert (refused.outcome, refused.window_kind, refused.allowance) == ("too_large", kind, 1_000)
    assert refused.room == 1_100 < 1_500  # in agreement: the plan's 1,000 and the block's 100
    big = await _topup(fresh_database, s.account, 700)
    admission = await ledger.admit(_ask(s, 1_500))
    assert admission.admitted, admission
    [row] = await query(fresh_database, "SELECT * FROM usage_ledger WHERE subscription_id = $1", s.id)
    # the plan holds what it has room for, one extra window the rest (the one it fits in)
    assert (row["held_tokens"], row["extra_window_id"], row["extra_held_tokens"]) == (1_000, big, 500)
    assert admission.room == 200  # the plan full; the roomiest block: 700 - 500 (the small one: 100)
    assert small < big


async def test_a_block_busy_with_requests_in_flight_is_full_not_too_large(fresh_database, ledger):
    """What a block could ever hold is its allowance less what it has posted: what requests in
    flight hold comes back. The request waits for them (window_full), not told it can never fit."""
    s = await _subscription(fresh_database, 1_000, 100_000)
    await _topup(fresh_database, s.account, 1_000)
    first = uuid.uuid4()
    assert (await ledger.admit(_ask(s, 1_500, first))).admitted  # 1,000 in the plan, 500 in the block
    waiting = await ledger.admit(_ask(s, 1_800))  # 800 past the plan: the block's 500 left cannot
    assert (waiting.outcome, waiting.window_kind) == ("window_full", "5h"), waiting
    await ledger.void(first, reason="t")
    assert (await ledger.admit(_ask(s, 1_800))).admitted


async def test_a_plan_only_try_past_the_plan_is_full_and_its_retry_draws_on_the_block(fresh_database):
    """A try marked plan-only (settlements of its process still waiting: migrations/0041) draws on
    no extra window: refused as full, nothing written, and tried again after them unmarked."""
    s = await _subscription(fresh_database, 1_000, 100_000)
    block = await _topup(fresh_database, s.account, 5_000)
    entry = uuid.uuid4()

    async def admit(plan_only: bool):
        return (await query(fresh_database, "SELECT * FROM ledger_admit_batch($1, $2, $3, $4, $5, $6, $7, $8, 60, $9)",
                            [entry], [s.id], [s.key], ["chat"], ["glm-4.6"], [750], [1_500], [1_500],
                            [plan_only]))[0]
    marked = await admit(True)
    assert (marked["outcome"], marked["window_kind"]) == ("window_full", "5h")
    assert not await query(fresh_database, "SELECT 1 FROM usage_ledger WHERE id = $1", entry)
    unmarked = await admit(False)
    assert unmarked["outcome"] == "admitted"
    [row] = await query(fresh_database, "SELECT * FROM usage_ledger WHERE id = $1", entry)
    assert (row["held_tokens"], row["extra_window_id"], row["extra_held_tokens"]) == (1_000, block, 500)


async def test_this_periods_overage_not_made_yet_counts_as_an_extra_window(fresh_database, ledger):
    s = await _subscription(fresh_database, 1_000, 100_000)
    await query(s.url, "UPDATE plans SET overage_cap_tokens = 2000 WHERE id = $1", s.plan)
    await query(s.url, "UPDATE accounts SET stripe_customer_id = 'cus_past' WHERE id = $1", s.account)
    await query(s.url, "INSERT INTO stripe_subscriptions (stripe_subscription_id, account_id, stripe_customer_id,"
                       " status, plan_id, current_period_start, current_period_end, has_overage_item, subscription_id)"
                       " VALUES ('sub_past', $1, 'cus_past', 'active', $2, now() - interval '1 day',"
                       " now() + interval '29 days', true, $3)", s.account, s.plan, s.id)
    refused = await ledger.admit(_ask(s, 3_500))  # 2,500 past the plan: more than the cap
    assert (refused.outcome, refused.window_kind) == ("too_large", "5h")
    assert not await query(fresh_database, "SELECT 1 FROM quota_windows WHERE kind = 'overage'")
    admission = await ledger.admit(_ask(s, 2_500))  # 1,500 past it: the overage window made for it
    assert admission.admitted, admission
    [row] = await query(fresh_database, "SELECT * FROM usage_ledger WHERE subscription_id = $1", s.id)
    assert (row["held_tokens"], row["extra_kind"], row["extra_held_tokens"]) == (1_000, "overage", 1_500)
