"""A declined upgrade serves, charges and suspends no more than what is paid (proven by a hunt
against the Stripe fake, tests/scratch_billing33_*.py; migrations/0058, service/billing/prorations.py):

- a way back down from an unpaid upgrade reaches the account at once;
- forgiving (voiding) the upgrade's invoice leaves the plan paid for served, past the grace;
- Stripe saying active again (a step down from the unpaid upgrade invoiced at a net credit) does
  not serve a plan larger than the one paid for while the upgrade's invoice is open;
- an upgrade's invoice still open when its period ends is voided, its page no longer offered, and a
  payment of it landing after that period's end is refunded in full: that plan was never served in it.
"""
from __future__ import annotations

import time

import httpx
import pytest

from .billing.conftest import WEBHOOK_SECRET, fake, one, start_billing_bridge, stripe_sync, wait_for  # noqa: F401
from .billing.test_lifecycle import Subscriber
from .billing.test_unpaid_changes import change_plan, grace_over, price

DAY = 86400


@pytest.fixture(scope="module")
def service(database, simulator, fake):  # noqa: F811
    assert stripe_sync(database, fake).returncode == 0
    # Stripe set to leave a subscription past_due after its retries (one of its three settings):
    # nothing but Codeplan's grace then ends what is unpaid
    fake.settings(retry_delays=[3 * DAY, 5 * DAY, 7 * DAY], after_retries="past_due")
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


def stripe_plan(user: Subscriber) -> str:
    item = next(i for i in user.stripe()["items"].data if i.price.recurring.usage_type == "licensed")
    return item.price.lookup_key.split("_")[1]


def declined_upgrade(user: Subscriber, to: str = "codeplan_max_month") -> dict:
    """The customer's card declines an upgrade invoiced at once: past_due, only the upgrade's
    proration invoice open, the plan paid for kept. That invoice's row."""
    before = user.row()["plan_id"]
    user.fake.payment_behavior(user.customer, "decline")
    change_plan(user, to)
    user.settle()
    invoice = user.open_invoice()
    assert invoice["billing_reason"] == "subscription_update" and invoice["prorations_only"] is True
    row = user.row()
    assert (row["plan_id"], row["status"], row["stripe_status"]) == (before, "active", "past_due"), dict(row)
    return invoice


def upgrade_declined_near_the_end(user: Subscriber) -> tuple[dict, str]:
    """An upgrade to max declined 5 days before the period ends (lite kept), and Stripe's first
    retry, 3 days later, declined too: its next retry falls 3 days into the next period. The
    upgrade's invoice row and id."""
    end = user.stripe()["items"].data[0].current_period_end
    user.fake.advance(end - user.fake.now() - 5 * DAY)
    invoice = declined_upgrade(user)
    user.fake.advance(4 * DAY)
    user.settle()
    assert user.fake.client().v1.invoices.retrieve(invoice["stripe_invoice_id"]).attempt_count == 2
    assert user.row()["plan_id"] == "lite"
    return invoice, invoice["stripe_invoice_id"]


def kept(fake, invoice_id: str) -> int:  # noqa: F811
    """What Stripe keeps of `invoice_id`'s payments: captured less refunded."""
    client = fake.client()
    total = 0
    for payment in client.v1.invoice_payments.list({"invoice": invoice_id}).data:
        intent = client.v1.payment_intents.retrieve(payment.payment.payment_intent)
        if intent.latest_charge:
            charge = client.v1.charges.retrieve(intent.latest_charge)
            if charge.paid:
                total += charge.amount_captured - charge.amount_refunded
    return total


def billing_state(service, user: Subscriber) -> dict:
    return httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {user.key}"}).json()


@pytest.mark.parametrize("behaviour", ["create_prorations", "none"])
def test_a_way_down_from_an_unpaid_upgrade_reaches_the_account(database, fake, service, behaviour):  # noqa: F811
    """pro paid; an upgrade to max declined (pro kept); then down to lite, with prorations left for
    the next invoice or none: Stripe holds lite, still past_due over max's invoice. lite is no
    larger than pro in every respect and its price no higher than pro's paid: served at once."""
    user = Subscriber(database, fake, service, "pro")
    assert user.chat() == 200
    fake.advance(10 * DAY)
    declined_upgrade(user)
    change_plan(user, "codeplan_lite_month", behaviour)
    user.settle()
    assert (user.stripe().status, stripe_plan(user)) == ("past_due", "lite")
    row = user.row()
    assert (row["plan_id"], row["status"]) == ("lite", "active"), dict(row)
    assert user.windows() == {"5h": 40_000_000, "week": 200_000_000}
    # what a later change is compared with: the price of the plan served, lite's
    assert one(database, "SELECT served_price_id FROM stripe_subscriptions WHERE stripe_subscription_id = $1",
               user.stripe_id)[0] == price(fake, "codeplan_lite_month").id


def test_a_forgiven_upgrade_leaves_the_plan_paid_for_served(database, fake, service):  # noqa: F811
    """lite paid, an upgrade to max declined, the grace over (lite kept: only the upgrade unpaid).
    The operator voids the upgrade's invoice: nothing is owed, Stripe still says past_due (its
    latest invoice void, neither paid nor a new one). lite, paid for, stays served: no 402, no
    grace shown, and the worker's grace pass suspends nothing."""
    user = Subscriber(database, fake, service, "lite")
    assert user.chat() == 200
    fake.advance(5 * DAY)
    invoice = declined_upgrade(user)
    grace_over(database, user)
    time.sleep(2.5)  # the worker's grace pass runs every second
    assert user.row()["status"] == "active"
    fake.client().v1.invoices.void_invoice(invoice["stripe_invoice_id"])
    user.settle()
    assert user.stripe().status == "past_due"
    time.sleep(2.5)
    row = user.row()
    assert (row["plan_id"], row["status"], row["refusal"]) == ("lite", "active", None), dict(row)
    assert user.chat() == 200
    assert billing_state(service, user)["subscription"]["grace_until"] is None

    # a renewal that fails afterwards is owed: the grace runs (counted from the renewal's failure,
    # 0059) and ends in a suspension
    fake.payment_behavior(user.customer, "decline")
    fake.advance(26 * DAY)
    user.settle()
    assert user.open_invoice()["billing_reason"] == "subscription_cycle"
    assert billing_state(service, user)["subscription"]["grace_until"] is not None
    grace_over(database, user)
    wait_for(lambda: user.row()["status"] == "past_due", 30, what="suspension once a renewal's grace is over")
    assert user.row()["refusal"] == "past_due"


def test_active_again_does_not_serve_a_larger_plan_while_the_upgrade_is_unpaid(database, fake, service):  # noqa: F811
    """lite paid; an upgrade to max declined (lite kept); then max -> pro invoiced at once: a net
    credit, a $0 invoice paid, so Stripe says active on pro while max's invoice is still open.
    pro is larger than lite and nothing of it is paid: lite stays until the upgrade is paid."""
    user = Subscriber(database, fake, service, "lite")
    assert user.chat() == 200
    fake.advance(5 * DAY)
    invoice = declined_upgrade(user)
    change_plan(user, "codeplan_pro_month")
    user.settle()
    assert (user.stripe().status, stripe_plan(user)) == ("active", "pro")
    assert fake.client().v1.invoices.retrieve(invoice["stripe_invoice_id"]).status == "open"
    row = user.row()
    assert (row["plan_id"], row["status"]) == ("lite", "active"), dict(row)
    assert user.windows() == {"5h": 40_000_000, "week": 200_000_000}

    fake.payment_behavior(user.customer, "ok")
    fake.client().v1.invoices.pay(invoice["stripe_invoice_id"])
    user.settle()
    assert user.row()["plan_id"] == "pro"  # paid: the plan Stripe holds


@pytest.mark.parametrize("way_back", [True, False])
def test_an_upgrade_unpaid_at_its_periods_end_is_voided(database, fake, service, way_back):  # noqa: F811
    """lite paid; 5 days before its period ends an upgrade to max declined: lite served the rest of it.
    The card fixed, the renewal paid (at lite's price if the customer scheduled the way back, else
    at max's, served from then). The old upgrade's invoice prorates days only lite was served: it
    is voided on Stripe, its page no longer offered, and Stripe's next retry charges nothing."""
    user = Subscriber(database, fake, service, "lite")
    assert user.chat() == 200
    invoice, ident = upgrade_declined_near_the_end(user)
    if way_back:
        fake.schedule_price(user.stripe_id, price(fake, "codeplan_lite_month").id)
        user.settle()
    fake.payment_behavior(user.customer, "ok")
    # Stripe refuses the void for a while (a 500): retried with backoff; meanwhile the invoice,
    # open on Stripe, is not offered to pay
    fake.fault(f"/v1/invoices/{ident}/void", 500, count=1000)
    try:
        end = user.stripe()["items"].data[0].current_period_end
        fake.advance(end - fake.now() + 3600)  # just past the period's end: the renewal is paid
        user.settle()
        row = user.row()
        assert (row["stripe_status"], row["status"], row["plan_id"]) == (
            "active", "active", "lite" if way_back else "max"), dict(row)
        wait_for(lambda: fake.requests(f"/v1/invoices/{ident}/void"), 30, what="a void asked")
        offered = [i for i in billing_state(service, user)["invoices"] if i["id"] == ident]
        assert offered and (offered[0]["status"], offered[0]["hosted_invoice_url"]) == ("open", None), offered
    finally:
        fake.clear_faults()
    wait_for(lambda: fake.client().v1.invoices.retrieve(ident).status == "void", 30,
             what="the old upgrade's invoice voided")
    user.settle()
    stale = one(database, "SELECT state, voided, refunded_amount FROM stale_proration_invoices"
                          " WHERE stripe_invoice_id = $1", ident)
    assert (stale["state"], stale["voided"], stale["refunded_amount"]) == ("done", True, 0)
    fake.advance(3 * DAY)  # when Stripe would have retried it
    user.settle()
    assert kept(fake, ident) == 0
    assert user.row()["plan_id"] == ("lite" if way_back else "max")


def test_an_upgrade_paid_after_its_periods_end_is_refunded_in_full(database, fake, service):  # noqa: F811
    """The same upgrade paid before the worker could void it: the events of the renewal and of the
    customer's late payment (its hosted page, opened before) arrive together. A payment landing
    after the period's end bought days already over, served lite: refunded in full, once."""
    user = Subscriber(database, fake, service, "lite")
    invoice, ident = upgrade_declined_near_the_end(user)
    seen = {e["id"] for e in fake.events()}
    fake.clear_endpoints()  # from here Stripe's events wait, and are delivered together below
    try:
        fake.payment_behavior(user.customer, "ok")
        end = user.stripe()["items"].data[0].current_period_end
        fake.advance(end - fake.now() + 3600)
        fake.client().v1.invoices.pay(ident)
        assert fake.client().v1.invoices.retrieve(ident).status == "paid"
        assert kept(fake, ident) == invoice["amount_due"]
        held = [e["id"] for e in fake.events() if e["id"] not in seen]
        result = fake.deliver(held, service.url + "/stripe/webhook", [WEBHOOK_SECRET], concurrency=1)
        assert result["ok"] == len(held), result
    finally:
        fake.add_endpoint(service.url + "/stripe/webhook", [WEBHOOK_SECRET])
    user.settle()
    wait_for(lambda: kept(fake, ident) == 0, 30, what="the late payment refunded")

    def settled():
        row = one(database, "SELECT state, voided, refunded_amount FROM stale_proration_invoices"
                            " WHERE stripe_invoice_id = $1", ident)
        return row if row is not None and row["state"] == "done" else None
    stale = wait_for(settled, 30, what="settled")
    assert (stale["voided"], stale["refunded_amount"]) == (False, invoice["amount_due"])
    user.settle()
    time.sleep(2)  # further passes (the refund's own events) refund nothing more
    refunds = [r for r in fake.objects()["refunds"] if r["metadata"].get("codeplan_invoice") == ident]
    assert sum(r["amount"] for r in refunds) == invoice["amount_due"]
