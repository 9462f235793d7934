"""Subscription state -> allowance, through a subscription's whole life on Stripe: renewals, failed
payments, grace, suspension, recovery, dunning's end, action required, trials, upgrades,
downgrades at period end, cancellation at period end. Stripe's side is the fake's clock."""
from __future__ import annotations

import datetime as dt

import httpx
import pytest

from ..conftest import settled_query
from .conftest import events_settled, new_account, one, start_billing_bridge, stripe_sync, wait_for
from .test_checkout import post, session_id

DAY = 86400


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    assert stripe_sync(database, fake).returncode == 0
    fake.settings(retry_delays=[3 * DAY, 5 * DAY, 7 * DAY], after_retries="canceled")
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


class Subscriber:
    def __init__(self, database, fake, service, plan: str, trial_days: int | None = None) -> None:
        self.database, self.fake, self.service = database, fake, service
        self.account, self.key = new_account(database)
        response = post(service, "/v1/billing/checkout", self.key, {"plan": plan})
        assert response.status_code == 200, response.text
        fake.complete_checkout(session_id(response.json()["url"]), trial_days=trial_days)
        events_settled(database, fake)
        row = one(database, "SELECT s.id, m.stripe_subscription_id, m.stripe_customer_id FROM subscriptions s"
                            " JOIN stripe_subscriptions m ON m.subscription_id = s.id WHERE s.account_id = $1",
                  self.account)
        self.local, self.stripe_id, self.customer = row[0], row[1], row[2]

    def row(self):
        return one(self.database, "SELECT s.status, s.plan_id, subscription_refusal(s) AS refusal, m.status AS stripe_status,"
                                  " m.grace_until, m.cancel_at_period_end, s.ended_at"
                                  " FROM subscriptions s JOIN stripe_subscriptions m ON m.subscription_id = s.id"
                                  " WHERE s.id = $1", self.local)

    def chat(self) -> int:
        """The status a coding tool gets for one small request."""
        return self.ask().status_code

    def ask(self, surface: str = "chat") -> httpx.Response:
        path, body = ("/v1/chat/completions", {"model": "glm-4.6", "max_tokens": 50,
                                               "messages": [{"role": "user", "content": "hi"}]})
        if surface == "messages":
            path, body = "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 50,
                                          "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(self.service.url + path, timeout=60, json=body,
                          headers={"authorization": f"Bearer {self.key}", "x-api-key": self.key,
                                   "anthropic-version": "2023-06-01"})

    def windows(self) -> dict[str, int]:
        rows = settled_query(self.database, "SELECT kind, allowance FROM quota_windows"
                                            " WHERE subscription_id = $1 AND ends_at > now()", self.local)
        return {r["kind"]: r["allowance"] for r in rows}

    def stripe(self):
        return self.fake.client().v1.subscriptions.retrieve(self.stripe_id)

    def open_invoice(self):
        return one(self.database, "SELECT * FROM billing_invoices WHERE stripe_subscription_id = $1 AND status = 'open'"
                                  " ORDER BY created_at DESC LIMIT 1", self.stripe_id)

    def settle(self) -> None:
        events_settled(self.database, self.fake)


def test_renewal_keeps_the_plan_and_records_the_invoice(database, fake, service):
    user = Subscriber(database, fake, service, "pro")
    fake.advance(32 * DAY)
    user.settle()
    assert user.row()["status"] == "active" and user.chat() == 200
    invoices = settled_query(database, "SELECT billing_reason, status, amount_paid FROM billing_invoices"
                                       " WHERE stripe_subscription_id = $1 ORDER BY created_at", user.stripe_id)
    assert [(r["billing_reason"], r["status"], r["amount_paid"]) for r in invoices] == [
        ("subscription_create", "paid", 3000), ("subscription_cycle", "paid", 3000)]


def test_payment_failure_grace_suspension_recovery(database, fake, service):
    user = Subscriber(database, fake, service, "pro")
    assert user.chat() == 200
    fake.payment_behavior(user.customer, "decline")
    fake.advance(32 * DAY)  # the renewal's charge is declined; Stripe will retry
    user.settle()
    row = user.row()
    # past_due, inside the grace period: the plan is kept
    assert (row["stripe_status"], row["status"], row["refusal"]) == ("past_due", "active", None)
    grace_left = (row["grace_until"] - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 3000 < grace_left <= 3600
    assert user.chat() == 200
    invoice = user.open_invoice()
    assert invoice["payment_problem"] == "payment_failed" and invoice["attempt_count"] == 1
    state = httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {user.key}"}).json()
    assert state["subscription"]["stripe_status"] == "past_due" and state["subscription"]["grace_until"]
    assert state["invoices"][0]["payment_problem"] == "payment_failed"

    # a Stripe retry fails again: still one grace period, counted from the first failure
    fake.advance(3 * DAY + 60)
    user.settle()
    assert user.row()["grace_until"] == row["grace_until"] and user.open_invoice()["attempt_count"] == 2

    # the grace period runs out (moved forward here rather than waited for): the plan is suspended
    settled_query(database, "UPDATE stripe_subscriptions SET grace_until = now() - interval '1 second'"
                            " WHERE stripe_subscription_id = $1 RETURNING 1", user.stripe_id)
    wait_for(lambda: user.row()["status"] == "past_due", 30, what="suspension after grace")
    assert user.row()["refusal"] == "past_due"
    before = settled_query(database, "SELECT count(*) AS n FROM usage_ledger WHERE subscription_id = $1",
                           user.local)[0]["n"]
    wait_for(lambda: user.chat() != 200, 30, what="requests refused once suspended")  # auth cache: a few seconds
    # refused in each tool's own protocol: a 402 naming the billing state and the billing page
    refused = user.ask("chat")
    assert refused.status_code == 402
    error = refused.json()["error"]
    assert error["code"] == "subscription_past_due" and error["type"] == "insufficient_quota"
    assert "past due" in error["message"] and "https://codeplan.example/billing" in error["message"]
    refused = user.ask("messages")
    assert refused.status_code == 402 and refused.json()["error"]["type"] == "billing_error"
    assert "https://codeplan.example/billing" in refused.json()["error"]["message"]
    assert "Invalid API key" not in refused.text
    assert settled_query(database, "SELECT count(*) AS n FROM usage_ledger WHERE subscription_id = $1",
                         user.local)[0]["n"] == before

    # the customer fixes the card and pays the invoice (hosted invoice page / Portal)
    fake.payment_behavior(user.customer, "ok")
    fake.client().v1.invoices.pay(invoice["stripe_invoice_id"])
    user.settle()
    row = user.row()
    assert (row["stripe_status"], row["status"], row["refusal"], row["grace_until"]) == ("active", "active", None, None)
    paid = one(database, "SELECT status, payment_problem FROM billing_invoices WHERE stripe_invoice_id = $1",
               invoice["stripe_invoice_id"])
    assert (paid["status"], paid["payment_problem"]) == ("paid", None)
    wait_for(lambda: user.chat() == 200, 30, what="requests served again after recovery")


def test_dunning_ends_in_unpaid_or_canceled_as_stripe_is_set(database, fake, service):
    fake.settings(after_retries="unpaid")
    try:
        unpaid = Subscriber(database, fake, service, "lite")
        fake.payment_behavior(unpaid.customer, "decline")
        fake.advance(32 * DAY + 16 * DAY)  # the renewal and all three retries fail
        unpaid.settle()
        row = unpaid.row()
        assert (row["stripe_status"], row["status"], row["refusal"]) == ("unpaid", "past_due", "unpaid")
        refused = wait_for(lambda: (r := unpaid.ask()).status_code == 402 and r, 30, what="402 when unpaid")
        assert refused.json()["error"]["code"] == "subscription_unpaid"
        # paying the open invoice brings it back
        fake.payment_behavior(unpaid.customer, "ok")
        fake.client().v1.invoices.pay(unpaid.open_invoice()["stripe_invoice_id"])
        unpaid.settle()
        assert (unpaid.row()["status"], unpaid.row()["refusal"]) == ("active", None)
    finally:
        fake.settings(after_retries="canceled")
    canceled = Subscriber(database, fake, service, "lite")
    fake.payment_behavior(canceled.customer, "decline")
    fake.advance(32 * DAY + 16 * DAY)
    canceled.settle()
    row = canceled.row()
    assert (row["stripe_status"], row["status"], row["refusal"]) == ("canceled", "canceled", "canceled")
    assert row["ended_at"] is not None


def test_payment_action_required_is_recorded_with_the_page_to_act_on(database, fake, service):
    user = Subscriber(database, fake, service, "pro")
    fake.payment_behavior(user.customer, "requires_action")
    fake.advance(32 * DAY)
    user.settle()
    invoice = user.open_invoice()
    assert invoice["payment_problem"] == "action_required" and invoice["hosted_invoice_url"].startswith("http")
    assert (user.row()["stripe_status"], user.row()["status"]) == ("past_due", "active")  # in grace


def test_trial_gets_the_plan(database, fake, service):
    user = Subscriber(database, fake, service, "max", trial_days=7)
    row = user.row()
    assert (row["stripe_status"], row["status"], row["plan_id"], row["refusal"]) == ("trialing", "active", "max", None)
    assert user.chat() == 200
    fake.advance(8 * DAY)  # the trial ends, the first real invoice is paid
    user.settle()
    assert (user.row()["stripe_status"], user.row()["status"]) == ("active", "active")


def test_upgrade_takes_effect_at_once_on_open_windows(database, fake, service):
    user = Subscriber(database, fake, service, "lite")
    assert user.chat() == 200
    assert user.windows() == {"5h": 40_000_000, "week": 200_000_000}
    sub = user.stripe()
    max_price = fake.client().v1.prices.list({"lookup_keys": ["codeplan_max_month"]}).data[0]
    fake.client().v1.subscriptions.update(user.stripe_id, {
        "items": [{"id": sub["items"].data[0].id, "price": max_price.id}], "proration_behavior": "always_invoice"})
    user.settle()
    assert user.row()["plan_id"] == "max"
    assert user.windows() == {"5h": 800_000_000, "week": 4_000_000_000}
    proration = settled_query(database, "SELECT amount_due, status FROM billing_invoices WHERE stripe_subscription_id = $1"
                                        " AND billing_reason = 'subscription_update'", user.stripe_id)
    assert len(proration) == 1 and proration[0]["amount_due"] > 0 and proration[0]["status"] == "paid"


def test_downgrade_waits_for_the_period_end_stripe_schedules(database, fake, service):
    user = Subscriber(database, fake, service, "max")
    assert user.chat() == 200
    lite = fake.client().v1.prices.list({"lookup_keys": ["codeplan_lite_month"]}).data[0]
    fake.schedule_price(user.stripe_id, lite.id)  # the Portal, set to downgrade at period end
    user.settle()
    assert user.row()["plan_id"] == "max" and user.windows()["5h"] == 800_000_000
    fake.advance(32 * DAY)
    user.settle()
    assert user.row()["plan_id"] == "lite" and user.row()["status"] == "active"
    assert user.windows() == {"5h": 40_000_000, "week": 200_000_000}
    renewal = settled_query(database, "SELECT amount_paid FROM billing_invoices WHERE stripe_subscription_id = $1"
                                      " AND billing_reason = 'subscription_cycle'", user.stripe_id)
    assert [r["amount_paid"] for r in renewal] == [600]


def test_cancel_at_period_end_then_subscribe_again(database, fake, service):
    user = Subscriber(database, fake, service, "pro")
    fake.client().v1.subscriptions.update(user.stripe_id, {"cancel_at_period_end": True})
    user.settle()
    row = user.row()
    assert row["cancel_at_period_end"] and row["status"] == "active" and user.chat() == 200
    fake.advance(32 * DAY)
    user.settle()
    row = user.row()
    assert (row["stripe_status"], row["status"], row["refusal"]) == ("canceled", "canceled", "canceled")
    refused = wait_for(lambda: (r := user.ask()).status_code == 402 and r, 30, what="402 after cancellation")
    # "subscription is canceled" while the key's owner is cached, "no active subscription" after
    assert refused.json()["error"]["code"] in ("subscription_canceled", "no_subscription")
    assert "https://codeplan.example/billing" in refused.json()["error"]["message"]
    # a canceled plan can be bought again: a new Codeplan subscription, fresh windows
    response = post(service, "/v1/billing/checkout", user.key, {"plan": "lite"})
    assert response.status_code == 200, response.text
    fake.complete_checkout(session_id(response.json()["url"]))
    user.settle()
    rows = settled_query(database, "SELECT plan_id, status FROM subscriptions WHERE account_id = $1 ORDER BY id",
                         user.account)
    assert [(r["plan_id"], r["status"]) for r in rows] == [("pro", "canceled"), ("lite", "active")]
    wait_for(lambda: user.chat() == 200, 30, what="requests served on the new plan")


def test_a_window_opening_while_the_plan_changes_takes_the_new_plan(database, fake, service):
    """The first request of a window reads the plan, then waits for the subscription's mutex; a
    plan change that commits meanwhile must not leave the new window at the old allowance."""
    import asyncio
    import threading

    import asyncpg

    user = Subscriber(database, fake, service, "lite")
    replies: list[int] = []

    async def race():
        holder = await asyncpg.connect(database)
        changer = await asyncpg.connect(database)
        try:
            await holder.execute("INSERT INTO subscription_flights (subscription_id) VALUES ($1)"
                                 " ON CONFLICT DO NOTHING", user.local)
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute("SELECT 1 FROM subscription_flights WHERE subscription_id = $1 FOR NO KEY UPDATE",
                                 user.local)
            request = threading.Thread(target=lambda: replies.append(user.chat()))
            request.start()
            await asyncio.sleep(1.5)  # admission has read the plan and waits for the mutex
            await changer.execute("UPDATE subscriptions SET plan_id = 'max' WHERE id = $1", user.local)
            await transaction.commit()
            await asyncio.to_thread(request.join, 60)
        finally:
            await holder.close()
            await changer.close()
    asyncio.run(race())
    assert replies == [200]
    assert user.windows() == {"5h": 800_000_000, "week": 4_000_000_000}


def test_an_upgrade_whose_payment_fails_keeps_the_paid_plan_until_it_is_paid(database, fake, service):
    user = Subscriber(database, fake, service, "lite")
    assert user.chat() == 200
    fake.payment_behavior(user.customer, "decline")  # the card now fails
    sub = user.stripe()
    max_price = fake.client().v1.prices.list({"lookup_keys": ["codeplan_max_month"]}).data[0]
    fake.client().v1.subscriptions.update(user.stripe_id, {
        "items": [{"id": sub["items"].data[0].id, "price": max_price.id}], "proration_behavior": "always_invoice"})
    user.settle()
    # Stripe holds the new price, past_due, its proration invoice open: the plan stays lite (the
    # account is in its grace period, so it is still served)
    assert (user.stripe().status, user.stripe()["items"].data[0].price.lookup_key) == ("past_due", "codeplan_max_month")
    proration = user.open_invoice()
    assert proration["billing_reason"] == "subscription_update" and proration["amount_paid"] == 0
    row = user.row()
    assert (row["plan_id"], row["status"], row["refusal"]) == ("lite", "active", None)
    assert user.windows() == {"5h": 40_000_000, "week": 200_000_000}
    assert user.chat() == 200
    # paid: the upgrade reaches the open windows
    fake.payment_behavior(user.customer, "ok")
    fake.client().v1.invoices.pay(proration["stripe_invoice_id"])
    user.settle()
    assert (user.row()["plan_id"], user.row()["status"]) == ("max", "active")
    assert user.windows() == {"5h": 800_000_000, "week": 4_000_000_000}


def test_a_downgrade_at_a_renewal_whose_payment_fails_goes_to_the_smaller_plan(database, fake, service):
    user = Subscriber(database, fake, service, "max")
    assert user.chat() == 200
    lite = fake.client().v1.prices.list({"lookup_keys": ["codeplan_lite_month"]}).data[0]
    fake.schedule_price(user.stripe_id, lite.id)  # the Portal, set to downgrade at period end
    user.settle()
    fake.payment_behavior(user.customer, "decline")
    fake.advance(32 * DAY)  # the renewal, at lite's price, fails
    user.settle()
    assert (user.stripe().status, user.stripe()["items"].data[0].price.lookup_key) == ("past_due", "codeplan_lite_month")
    # in the grace period on the plan ordered (and billed by the open invoice), not the larger one
    assert (user.row()["plan_id"], user.row()["status"]) == ("lite", "active")
    assert user.windows() == {"5h": 40_000_000, "week": 200_000_000}
