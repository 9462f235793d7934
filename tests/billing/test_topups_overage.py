"""Top-ups and overage in the ledger: a bought block is spent only on what an exhausted window
cannot hold and a refund takes back what remains; overage goes beyond an exhausted window up to the
per-account cap, is marked in the ledger and reaches Stripe through the meter outbox, once."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from ..conftest import new_user, query, run, settled_query
from .conftest import events_settled, new_account, one, start_billing_bridge, stripe_sync, wait_for
from .test_checkout import post, session_id

DAY = 86400
# a plan small enough to exhaust in a few dozen requests
TINY = dict(window=3000, weekly=12000)
CAP = 1500
ENV = {"CODEPLAN_OVERAGE_PLANS": "pro,max,tiny", "CODEPLAN_OVERAGE_CAP_TOKENS": str(CAP),
       # one cent per token, so the renewal invoice shows the overage plainly
       "CODEPLAN_OVERAGE_CENTS_PER_MILLION": "1000000", "CODEPLAN_AUTH_CACHE_TTL": "0"}


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    run(query(database, "INSERT INTO plans (id, name, window_tokens, weekly_tokens, monthly_price_cents, models)"
                        " VALUES ('tiny', 'Tiny', $1, $2, 100, ARRAY['glm-4.6', 'glm-4.5', 'glm-4.5-air'])",
              TINY["window"], TINY["weekly"]))
    assert stripe_sync(database, fake, **ENV).returncode == 0
    server = start_billing_bridge(database, simulator, fake, **ENV)
    yield server
    server.stop()


def ask(service, key: str, tokens: int = 30) -> httpx.Response:
    return httpx.post(service.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "max_tokens": 40,
                            "messages": [{"role": "user", "content": f"[[sim tokens={tokens} reasoning=0]] hi"}]})


def windows(database: str, subscription: int) -> dict[str, dict]:
    rows = settled_query(database, "SELECT * FROM quota_windows WHERE subscription_id = $1 AND ends_at > now()"
                                   " ORDER BY id", subscription)
    return {r["kind"]: dict(r) for r in rows}


def entries(database: str, subscription: int) -> list[dict]:
    return [dict(r) for r in settled_query(database, "SELECT * FROM usage_ledger WHERE subscription_id = $1"
                                                     " ORDER BY created_at", subscription)]


def subscription_of(database: str, account: int) -> int:
    return one(database, "SELECT id FROM subscriptions WHERE account_id = $1 AND status <> 'canceled'", account)[0]


def buy_topup(service, fake, database, key: str, block: str = "20000000") -> dict:
    response = post(service, "/v1/billing/topup", key, {"block": block})
    assert response.status_code == 200, response.text
    fake.complete_checkout(session_id(response.json()["url"]))
    events_settled(database, fake)
    return dict(one(database, "SELECT * FROM topups WHERE stripe_checkout_session_id = $1",
                    session_id(response.json()["url"])))


def test_a_topup_is_spent_only_on_what_the_exhausted_window_cannot_hold(database, fake, service):
    key = new_user(database, "tiny")
    account = one(database, "SELECT account_id FROM api_keys WHERE prefix = $1", key[:10])[0]
    subscription = subscription_of(database, account)
    topup = buy_topup(service, fake, database, key)
    window = one(database, "SELECT * FROM quota_windows WHERE id = $1", topup["window_id"])
    assert (window["kind"], window["allowance"], window["subscription_id"]) == ("topup", 20_000_000, subscription)
    assert 364.99 < (window["ends_at"] - topup["purchased_at"]).total_seconds() / DAY < 365.01

    statuses = [ask(service, key).status_code for _ in range(120)]
    assert statuses == [200] * 120  # the window ran out long ago; the block carried on
    plan, extra = windows(database, subscription)["5h"], windows(database, subscription)["topup"]
    rows = entries(database, subscription)
    billed = sum(r["billed_tokens"] for r in rows)
    assert billed > TINY["window"] + 1000
    # the plan's window is used to its last token, never past it; the block paid the rest
    assert plan["posted"] == plan["allowance"] == TINY["window"]
    assert extra["posted"] == sum(r["extra_billed_tokens"] for r in rows) == billed - plan["posted"]
    assert all(w["held"] == w["reserved"] == 0 for w in (plan, extra))
    # in order: requests the window could hold drew nothing on the block
    first_extra = next(i for i, r in enumerate(rows) if r["extra_window_id"] is not None)
    assert all(r["extra_billed_tokens"] == 0 and r["extra_kind"] is None for r in rows[:first_extra])
    assert all(r["extra_kind"] == "topup" for r in rows[first_extra:])
    assert sum(r["billed_tokens"] for r in rows[:first_extra]) > TINY["window"] - 200
    state = httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {key}"}).json()
    assert state["topups"][0]["used"] == extra["posted"]
    assert state["topups"][0]["remaining"] == 20_000_000 - extra["posted"]

    # a refund of half takes back half the block from what remains; a full one, all that remains
    client = fake.client()
    client.v1.refunds.create({"payment_intent": topup["stripe_payment_intent_id"], "amount": 500})
    events_settled(database, fake)
    after = one(database, "SELECT * FROM topups WHERE id = $1", topup["id"])
    assert (after["amount_refunded"], after["tokens_revoked"]) == (500, 10_000_000)
    assert one(database, "SELECT allowance FROM quota_windows WHERE id = $1", topup["window_id"])[0] == 10_000_000
    client.v1.refunds.create({"payment_intent": topup["stripe_payment_intent_id"]})
    events_settled(database, fake)
    gone = one(database, "SELECT * FROM quota_windows WHERE id = $1", topup["window_id"])
    assert gone["allowance"] == gone["posted"] + gone["held"] == extra["posted"]
    refused = ask(service, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "1308"


def test_an_expired_block_is_not_spent(database, fake, service):
    key = new_user(database, "tiny")
    account = one(database, "SELECT account_id FROM api_keys WHERE prefix = $1", key[:10])[0]
    topup = buy_topup(service, fake, database, key)
    run(query(database, "UPDATE quota_windows SET ends_at = now() - interval '1 second' WHERE id = $1",
              topup["window_id"]))
    statuses = [ask(service, key).status_code for _ in range(90)]
    assert 429 in statuses and statuses[statuses.index(429):] == [429] * (90 - statuses.index(429))
    assert one(database, "SELECT posted FROM quota_windows WHERE id = $1", topup["window_id"])[0] == 0
    assert sum(r["extra_billed_tokens"] for r in entries(database, subscription_of(database, account))) == 0


def test_concurrent_requests_at_the_edge_never_pass_any_allowance(database, fake, service):
    key = new_user(database, "tiny")
    account = one(database, "SELECT account_id FROM api_keys WHERE prefix = $1", key[:10])[0]
    subscription = subscription_of(database, account)
    topup = buy_topup(service, fake, database, key)
    # leave the block 800 tokens, so concurrency meets both edges
    run(query(database, "UPDATE quota_windows SET allowance = 800 WHERE id = $1", topup["window_id"]))

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one_request():
                response = await client.post(
                    service.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                    json={"model": "glm-4.6", "max_tokens": 40,
                          "messages": [{"role": "user", "content": "[[sim tokens=30 reasoning=0]] hi"}]})
                return response.status_code
            return await asyncio.gather(*(one_request() for _ in range(150)))
    statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 429} and statuses.count(200) > 50 and 429 in statuses
    found = windows(database, subscription)
    for kind in ("5h", "week", "topup"):
        w = found[kind]
        assert w["posted"] <= w["allowance"] and w["held"] == w["reserved"] == 0, (kind, w)
    rows = entries(database, subscription)
    assert found["5h"]["posted"] == sum(r["billed_tokens"] - r["extra_billed_tokens"] for r in rows)
    assert found["topup"]["posted"] == sum(r["extra_billed_tokens"] for r in rows)
    # under a burst, holds (the worst case of each request in flight) fill the windows: some are
    # refused while posted stays below the allowance; the block took what the plan could not hold
    assert found["topup"]["posted"] > 0 and any(r["extra_kind"] == "topup" for r in rows)
    assert sum(r["billed_tokens"] for r in rows) == found["5h"]["posted"] + found["topup"]["posted"]


def test_a_block_bought_without_a_plan_waits_and_outlives_its_subscription(database, fake, service):
    account, key = new_account(database)
    url = post(service, "/v1/billing/checkout", key, {"plan": "tiny"}).json()["url"]
    fake.complete_checkout(session_id(url))
    events_settled(database, fake)
    first = subscription_of(database, account)
    topup = buy_topup(service, fake, database, key)
    assert one(database, "SELECT subscription_id FROM quota_windows WHERE id = $1", topup["window_id"])[0] == first
    stripe_id = one(database, "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", first)[0]
    fake.client().v1.subscriptions.cancel(stripe_id)
    events_settled(database, fake)
    assert one(database, "SELECT status FROM subscriptions WHERE id = $1", first)[0] == "canceled"
    url = post(service, "/v1/billing/checkout", key, {"plan": "tiny"}).json()["url"]
    fake.complete_checkout(session_id(url))
    events_settled(database, fake)
    second = subscription_of(database, account)
    assert second != first
    assert one(database, "SELECT subscription_id FROM quota_windows WHERE id = $1", topup["window_id"])[0] == second


def test_overage_beyond_the_window_up_to_the_cap_billed_once_through_the_meter(database, fake, service):
    account, key = new_account(database)
    url = post(service, "/v1/billing/checkout", key, {"plan": "tiny"}).json()["url"]
    fake.complete_checkout(session_id(url))
    events_settled(database, fake)
    subscription = subscription_of(database, account)
    mirror = one(database, "SELECT * FROM stripe_subscriptions WHERE subscription_id = $1", subscription)
    assert mirror["has_overage_item"] and mirror["current_period_start"] is not None

    statuses = [ask(service, key).status_code for _ in range(150)]
    assert statuses[:60] == [200] * 60 and statuses[-1] == 429  # the plan, then overage, then the cap
    found = windows(database, subscription)
    plan, overage = found["5h"], found["overage"]
    assert plan["posted"] == TINY["window"]
    assert (overage["allowance"], overage["starts_at"], overage["ends_at"]) == (
        CAP, mirror["current_period_start"], mirror["current_period_end"])
    assert CAP - 200 < overage["posted"] <= CAP
    rows = entries(database, subscription)
    marked = [r for r in rows if r["extra_kind"] == "overage"]
    assert marked and sum(r["extra_billed_tokens"] for r in marked) == overage["posted"]
    refused = ask(service, key)
    assert refused.status_code == 429
    state = httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {key}"}).json()
    assert state["overage"]["used"] == overage["posted"] and state["overage"]["cap"] == CAP

    # the settlements put the overage in the outbox, per minute; once a minute is over the worker
    # freezes its row and sends it (frozen here at once rather than waited for)
    customer = mirror["stripe_customer_id"]
    outbox = settled_query(database, "SELECT sum(value)::bigint AS v FROM meter_outbox WHERE stripe_customer_id = $1",
                           customer)[0]["v"]
    assert outbox == overage["posted"]
    run(query(database, "UPDATE meter_outbox SET state = 'sending', frozen_at = now()"
                        " WHERE stripe_customer_id = $1 AND state = 'open'", customer))
    wait_for(lambda: not one(database, "SELECT count(*) FROM meter_outbox WHERE stripe_customer_id = $1"
                                       " AND state <> 'sent'", customer)[0], 60, what="overage sent")
    sent = [e for e in fake.meter_events() if e["payload"]["stripe_customer_id"] == customer]
    assert sum(int(e["payload"]["value"]) for e in sent) == overage["posted"]

    # and Stripe bills it once, on the renewal invoice, at the overage price
    fake.advance(32 * DAY)
    events_settled(database, fake)
    renewal = settled_query(database, "SELECT amount_due, status FROM billing_invoices"
                                      " WHERE stripe_subscription_id = $1 AND billing_reason = 'subscription_cycle'",
                            mirror["stripe_subscription_id"])
    assert [(r["amount_due"], r["status"]) for r in renewal] == [(100 + overage["posted"], "paid")]


def test_a_disputed_topup_is_taken_back_and_given_back_when_the_dispute_is_won(database, fake, service):
    key = new_user(database, "tiny")
    topup = buy_topup(service, fake, database, key)
    client = fake.client()
    charge = client.v1.payment_intents.retrieve(topup["stripe_payment_intent_id"]).latest_charge

    def block() -> tuple[int, int, int]:
        row = one(database, "SELECT t.amount_disputed, t.tokens_revoked, q.allowance FROM topups t"
                            " JOIN quota_windows q ON q.id = t.window_id WHERE t.id = $1", topup["id"])
        return tuple(row)

    # an inquiry withdraws nothing: the block stays
    inquiry = fake.dispute(charge, "warning_needs_response")
    events_settled(database, fake)
    assert block() == (0, 0, 20_000_000)
    fake.close_dispute(inquiry["id"], "warning_closed")
    # a chargeback withdraws the payment at once: the block is taken back with it
    dispute = fake.dispute(charge)
    events_settled(database, fake)
    assert block() == (1000, 20_000_000, 0)
    shown = httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {key}"}).json()["topups"][0]
    assert (shown["amount_disputed"], shown["revoked"], shown["remaining"]) == (1000, 20_000_000, 0)
    # the dispute won, the money reinstated: the block comes back
    fake.close_dispute(dispute["id"], "won")
    events_settled(database, fake)
    assert block() == (0, 0, 20_000_000)
    types = {r["type"]: r["state"] for r in settled_query(
        database, "SELECT type, state FROM stripe_events WHERE type LIKE 'charge.dispute.%'")}
    assert set(types) == {"charge.dispute.created", "charge.dispute.funds_withdrawn", "charge.dispute.closed",
                          "charge.dispute.funds_reinstated"} and set(types.values()) == {"applied"}


def test_a_dispute_lost_after_a_partial_refund_takes_back_the_whole_block(database, fake, service):
    key = new_user(database, "tiny")
    topup = buy_topup(service, fake, database, key)
    client = fake.client()
    client.v1.refunds.create({"payment_intent": topup["stripe_payment_intent_id"], "amount": 400})
    events_settled(database, fake)
    charge = client.v1.payment_intents.retrieve(topup["stripe_payment_intent_id"]).latest_charge
    dispute = fake.dispute(charge)  # what was not refunded
    fake.close_dispute(dispute["id"], "lost")
    events_settled(database, fake)
    row = one(database, "SELECT t.amount_refunded, t.amount_disputed, t.tokens_revoked, q.allowance FROM topups t"
                        " JOIN quota_windows q ON q.id = t.window_id WHERE t.id = $1", topup["id"])
    assert tuple(row) == (400, 600, 20_000_000, 0)
