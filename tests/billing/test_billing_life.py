"""Billing over a customer's months, where it went wrong before (proven against the Stripe fake):
an invoice still payable after dunning cancelled its subscription, a customer deleted on Stripe
who could never buy again, an expired waiting top-up shown as remaining, a declined upgrade that
suspended the plan already paid for once the grace ran out."""
from __future__ import annotations

import time

import httpx
import pytest

from service import db

from ..conftest import database_before, query, settled_query
from .conftest import events_settled, new_account, one, start_billing_bridge, stripe_sync, wait_for
from .test_checkout import post, session_id
from .test_lifecycle import Subscriber

DAY = 86400


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    assert stripe_sync(database, fake).returncode == 0
    fake.settings(retry_delays=[3 * DAY, 5 * DAY, 7 * DAY], after_retries="canceled")
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


def state(service, key: str) -> dict:
    return httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {key}"}, timeout=60).json()


def dunning_cancels(user: Subscriber) -> dict:
    """The renewal is declined, Stripe's three retries fail, Stripe cancels the subscription
    (after_retries = canceled). The renewal invoice, as Codeplan recorded it."""
    fake = user.fake
    fake.payment_behavior(user.customer, "decline")
    fake.advance(32 * DAY)
    user.settle()
    invoice = user.open_invoice()
    assert invoice is not None and invoice["billing_reason"] == "subscription_cycle"
    for _ in range(3):
        fake.advance(8 * DAY)
    user.settle()
    assert user.stripe().status == "canceled" and user.row()["status"] == "canceled"
    return invoice


def stripe_invoice(fake, ident: str):
    return fake.client().v1.invoices.retrieve(ident)


def test_an_invoice_left_open_by_dunnings_cancellation_is_voided(database, fake, service):
    """Stripe leaves a cancelled subscription's finalized invoices open and payable: Codeplan voids
    them, so nobody pays for a month that will not be served."""
    user = Subscriber(database, fake, service, "lite")
    invoice = dunning_cancels(user)
    wait_for(lambda: stripe_invoice(fake, invoice["stripe_invoice_id"]).status == "void", 30,
             what="the ended subscription's open invoice voided on Stripe")
    voids = [r for r in fake.requests(f"/v1/invoices/{invoice['stripe_invoice_id']}/void") if r["status"] == 200]
    assert len(voids) == 1 and voids[0]["idempotency_key"].startswith("codeplan-")
    user.settle()
    wait_for(lambda: one(database, "SELECT status FROM billing_invoices WHERE stripe_invoice_id = $1",
                         invoice["stripe_invoice_id"])[0] == "void", 30, what="invoice.voided applied")
    def settled():
        row = one(database, "SELECT * FROM ended_subscription_invoices WHERE stripe_subscription_id = $1",
                  user.stripe_id)
        return row if row["state"] != "pending" else None
    row = wait_for(settled, 30, what="the ended subscription settled")
    assert (row["state"], row["voided"], row["refunded_amount"]) == ("done", 1, 0)
    # the customer's hosted page no longer takes the money
    fake.payment_behavior(user.customer, "ok")
    with pytest.raises(Exception, match="status void"):
        fake.client().v1.invoices.pay(invoice["stripe_invoice_id"])
    # the first month, paid and served, is untouched
    assert not [r for r in fake.requests("/v1/refunds") if r["method"] == "POST"
                and r["params"].get("metadata", {}).get("codeplan_account_id") == str(user.account)]


def test_a_payment_landing_on_an_ended_subscriptions_invoice_is_refunded(database, fake, service):
    """Paid before it could be voided (here: Stripe refuses the void for a while): the money goes
    back, in full, once; meanwhile the billing state offers no page to pay it."""
    user = Subscriber(database, fake, service, "lite")
    fake.payment_behavior(user.customer, "decline")
    fake.advance(32 * DAY)
    user.settle()
    invoice = user.open_invoice()
    ident = invoice["stripe_invoice_id"]
    fake.fault(f"/v1/invoices/{ident}/void", 500, count=10_000)
    try:
        for _ in range(3):
            fake.advance(8 * DAY)
        user.settle()
        assert user.stripe().status == "canceled"
        wait_for(lambda: fake.requests(f"/v1/invoices/{ident}/void"), 30, what="a void attempted")
        shown = [i for i in state(service, user.key)["invoices"] if i["id"] == ident][0]
        assert shown["status"] == "open" and shown["hosted_invoice_url"] is None
        # the customer pays it late anyway (the page was opened before; the Portal)
        fake.advance(DAY)
        fake.payment_behavior(user.customer, "ok")
        paid = fake.client().v1.invoices.pay(ident)
        assert paid.status == "paid" and paid.amount_paid == 600
        user.settle()

        def refunded() -> int:
            charges = [c for c in fake.objects()["charges"] if c["customer"] == user.customer]
            return sum(c["amount_refunded"] for c in charges)
        wait_for(lambda: refunded() == 600, 60, what="the late payment refunded")
    finally:
        fake.clear_faults()
    user.settle()
    time.sleep(2)  # the worker's further passes (events about the refund) refund nothing more
    mine = [r for r in fake.requests("/v1/refunds") if r["method"] == "POST" and r["status"] == 200
            and r["params"].get("metadata", {}).get("codeplan_account_id") == str(user.account)]
    assert len(mine) == 1 and mine[0]["params"]["metadata"]["codeplan_invoice"] == ident
    assert mine[0]["idempotency_key"].startswith("codeplan-")
    row = wait_for(lambda: (r := one(database, "SELECT * FROM ended_subscription_invoices"
                                               " WHERE stripe_subscription_id = $1", user.stripe_id))["state"] != "pending"
                   and r, 30, what="the ended subscription settled")
    assert (row["state"], row["refunded_amount"]) == ("done", 600)
    # the subscription stays ended: nothing is served for the money, all of which went back
    assert user.row()["status"] == "canceled"


def test_a_customer_deleted_on_stripe_can_subscribe_again(database, fake, service):
    """Deleted in Stripe's Dashboard (or a GDPR request): Stripe cancels its subscriptions at once.
    The person keeps the Codeplan account and buys again, as a new customer."""
    user = Subscriber(database, fake, service, "pro")
    assert user.chat() == 200
    fake.client().v1.customers.delete(user.customer)
    user.settle()
    assert user.row()["status"] == "canceled"
    assert one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", user.account)[0] is None
    # nothing to manage in the Portal until a new purchase: a clear 409, not a 502
    portal = post(service, "/v1/billing/portal", user.key)
    assert portal.status_code == 409, portal.text
    response = post(service, "/v1/billing/checkout", user.key, {"plan": "lite"})
    assert response.status_code == 200, (response.status_code, response.text)
    new = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", user.account)[0]
    assert new and new != user.customer
    fake.complete_checkout(session_id(response.json()["url"]))
    user.settle()
    rows = settled_query(database, "SELECT plan_id, status FROM subscriptions WHERE account_id = $1 ORDER BY id",
                         user.account)
    assert [(r["plan_id"], r["status"]) for r in rows] == [("pro", "canceled"), ("lite", "active")]
    assert post(service, "/v1/billing/portal", user.key).status_code == 200


def test_a_deleted_customer_still_stored_is_replaced_at_the_next_purchase(database, fake, service):
    """The customer.deleted event never reached Codeplan (the endpoint not subscribed to it): the
    account still names the deleted customer. Checkout finds it gone and makes a new one, under an
    idempotency key of its own (Stripe would replay the deleted customer for the old key)."""
    user = Subscriber(database, fake, service, "lite")
    fake.client().v1.customers.delete(user.customer)
    user.settle()
    settled_query(database, "UPDATE accounts SET stripe_customer_id = $2 WHERE id = $1 RETURNING 1",
                  user.account, user.customer)
    response = post(service, "/v1/billing/checkout", user.key, {"plan": "pro"})
    assert response.status_code == 200, (response.status_code, response.text)
    new = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", user.account)[0]
    assert new and new != user.customer
    assert fake.client().v1.customers.retrieve(new).email
    creates = [r for r in fake.requests("/v1/customers") if r["method"] == "POST" and r["status"] == 200
               and r["params"].get("metadata", {}).get("codeplan_account_id") == str(user.account)]
    keys = [r["idempotency_key"] for r in creates]
    assert len(set(keys)) == 2, keys  # the first key replayed the deleted customer; the next made a new one


def test_an_expired_waiting_topup_is_not_shown_as_remaining(database, fake, service):
    """A top-up paid after the subscription ended waits for the next one; once its validity is over
    it can never be used, and /v1/billing shows none of it remaining."""
    user = Subscriber(database, fake, service, "lite")
    response = post(service, "/v1/billing/topup", user.key, {"block": "20000000"})
    assert response.status_code == 200, response.text
    fake.client().v1.subscriptions.cancel(user.stripe_id)
    user.settle()
    fake.complete_checkout(session_id(response.json()["url"]))
    user.settle()
    row = one(database, "SELECT id, window_id FROM topups WHERE account_id = $1", user.account)
    assert row["window_id"] is None
    assert state(service, user.key)["topups"][0]["remaining"] == 20_000_000  # still valid: all of it waits
    settled_query(database, "UPDATE topups SET expires_at = now() - interval '1 second' WHERE id = $1 RETURNING 1",
                  row["id"])
    assert state(service, user.key)["topups"][0]["remaining"] == 0


def test_a_declined_upgrade_keeps_the_paid_plan_after_the_grace(database, fake, service):
    """lite paid for the month, an upgrade to max whose proration invoice is declined: Stripe says
    past_due, but only the upgrade is unpaid. Once the grace period is over the month of lite is
    still served (README: kept until the upgrade is paid); a renewal that fails still suspends."""
    # Stripe set to leave a subscription past_due after its retries (else the proration invoice's
    # failed retries cancel it after 15 days, before the renewal this test reaches)
    fake.settings(after_retries="past_due")
    try:
        user = Subscriber(database, fake, service, "lite")
        assert user.chat() == 200
        fake.payment_behavior(user.customer, "decline")
        sub = user.stripe()
        max_price = fake.client().v1.prices.list({"lookup_keys": ["codeplan_max_month"]}).data[0]
        fake.client().v1.subscriptions.update(user.stripe_id, {
            "items": [{"id": sub["items"].data[0].id, "price": max_price.id}],
            "proration_behavior": "always_invoice"})
        user.settle()
        row = user.row()
        assert (row["plan_id"], row["status"], row["stripe_status"]) == ("lite", "active", "past_due")
        shown = state(service, user.key)
        assert shown["subscription"]["grace_until"] is None  # no grace runs: the plan paid for is kept
        assert shown["invoices"][0]["payment_problem"] == "payment_failed" and shown["invoices"][0]["hosted_invoice_url"]
        settled_query(database, "UPDATE stripe_subscriptions SET grace_until = now() - interval '1 second'"
                                " WHERE stripe_subscription_id = $1 RETURNING 1", user.stripe_id)
        time.sleep(3)  # the worker's grace pass runs every second
        row = user.row()
        assert (row["plan_id"], row["status"], row["refusal"]) == ("lite", "active", None), dict(row)
        # an event applied again after the grace keeps it too
        fake.client().v1.subscriptions.update(user.stripe_id, {"metadata": {"touched": "1"}})
        user.settle()
        row = user.row()
        assert (row["plan_id"], row["status"], row["refusal"]) == ("lite", "active", None), dict(row)
        assert user.chat() == 200
        # the renewal fails too: a month unpaid, with a grace of its own counted from its failure
        # (0059), and suspended once that is over
        fake.advance(32 * DAY)
        user.settle()
        assert user.row()["status"] == "active"
        settled_query(database, "UPDATE stripe_subscriptions SET grace_until = now() - interval '1 second'"
                                " WHERE stripe_subscription_id = $1 RETURNING 1", user.stripe_id)
        wait_for(lambda: user.row()["status"] == "past_due", 30, what="suspension once the renewal's grace is over")
        assert user.row()["refusal"] == "past_due"
    finally:
        fake.settings(after_retries="canceled")


async def test_migration_0052_queues_what_ended_before_it_with_an_invoice_open(pg_url, tmp_path):
    """An upgrade: subscriptions that ended before 0052 with an invoice still open (or paid after
    their end) are settled by the worker too; others are left alone."""
    url = await database_before(pg_url, tmp_path, "0052")
    account = (await query(url, "INSERT INTO accounts (email) VALUES ('upgrade@example.com') RETURNING id"))[0]["id"]
    cases = {"sub_ended_open": ("canceled", "open", None), "sub_ended_paid_late": ("canceled", "paid", "1 hour"),
             "sub_ended_paid_before": ("canceled", "paid", "20 days"), "sub_live_open": ("past_due", "open", None)}
    for ident, (status, invoice_status, paid_ago) in cases.items():
        await query(url, "INSERT INTO stripe_subscriptions (stripe_subscription_id, account_id, stripe_customer_id,"
                         " status, ended_at) VALUES ($1, $2, 'cus_x', $3,"
                         " CASE WHEN $3 = 'canceled' THEN now() - interval '2 days' END)", ident, account, status)
        await query(url, "INSERT INTO billing_invoices (stripe_invoice_id, account_id, stripe_subscription_id, status,"
                         " billing_reason, amount_due, amount_paid, currency, created_at, paid_at)"
                         " VALUES ('in_' || $1, $2, $1, $3, 'subscription_cycle', 600, 0, 'usd',"
                         " now() - interval '30 days', now() - $4::text::interval)", ident, account, invoice_status,
                    paid_ago)
    await db.migrate(url)
    rows = await query(url, "SELECT stripe_subscription_id, state FROM ended_subscription_invoices ORDER BY 1")
    assert [(r["stripe_subscription_id"], r["state"]) for r in rows] == [
        ("sub_ended_open", "pending"), ("sub_ended_paid_late", "pending")]


def test_an_invoice_stripe_makes_at_or_after_the_end_is_kept_open():
    """Stripe bills a cancelled subscription's last period of metered usage (the overage) in an
    invoice made at its end, or at the cancellation with `invoice_now`: that bills what was served,
    and voiding it (as the renewal left unpaid before the end is) would give the overage away."""
    import asyncio

    from service.billing import wire as billing_wire
    from service.billing.ended import EndedInvoices

    ended_at = 1_800_000_000
    voided: list[str] = []

    class Stripe:
        async def subscription(self, ident):
            return billing_wire.Subscription(id=ident, customer="cus_1", status="canceled",
                                             items=billing_wire.SubscriptionItems(data=[]), ended_at=ended_at)

        async def invoices_of(self, ident):
            def invoice(ident: str, created: int) -> billing_wire.Invoice:  # a month's fee ahead
                ahead = billing_wire.InvoiceLine(amount=600, period=billing_wire.LinePeriod(created, created + 30 * 86_400))
                return billing_wire.Invoice(id=ident, currency="usd", created=created, status="open",
                                            lines=billing_wire.InvoiceLines(data=[ahead]))
            return [invoice("in_renewal", ended_at - 86_400 * 20), invoice("in_final", ended_at),
                    invoice("in_later", ended_at + 60)]

        async def void_invoice(self, ident, key):
            voided.append(ident)
            return billing_wire.Invoice(id=ident, currency="usd", created=0, status="void")

    settled = asyncio.run(EndedInvoices(None, Stripe(), "inst", 1.0)._settle("sub_1", 7))
    assert voided == ["in_renewal"] and settled == (1, 0)


def test_a_renewal_carrying_served_overage_stays_payable_and_its_late_payment_refunds_the_rest(
        database, fake, service):
    """A renewal bills the next period's fee and, in arrears, the last period's metered overage:
    voided (or refunded in full) after dunning's cancellation, the overage served was given away
    (a review proved it). It stays payable; a late payment gets back all but the overage."""
    user = Subscriber(database, fake, service, "pro")
    fake.client().v1.billing.meter_events.create({
        "event_name": "codeplan_overage_tokens", "identifier": f"cp-served-{user.customer}",
        "payload": {"stripe_customer_id": user.customer, "value": "10000000"}})
    invoice = dunning_cancels(user)
    ident = invoice["stripe_invoice_id"]
    renewal = stripe_invoice(fake, ident)
    usage = sum(line.amount for line in renewal.lines.data if "usage" in (line.description or ""))
    assert usage == 1500 and renewal.amount_due > usage
    row = wait_for(lambda: (r := one(database, "SELECT * FROM ended_subscription_invoices"
                                               " WHERE stripe_subscription_id = $1", user.stripe_id))
                   and r["state"] != "pending" and r, 30, what="the ended subscription settled")
    assert (row["state"], row["voided"]) == ("done", 0)
    assert stripe_invoice(fake, ident).status == "open" and not fake.requests(f"/v1/invoices/{ident}/void")
    fake.advance(DAY)
    fake.payment_behavior(user.customer, "ok")
    paid = fake.client().v1.invoices.pay(ident)
    user.settle()

    def refunded() -> int:
        return sum(c["amount_refunded"] for c in fake.objects()["charges"] if c["customer"] == user.customer)
    wait_for(lambda: refunded() == paid.amount_paid - usage, 60, what="the unserved part refunded")
    user.settle()
    time.sleep(2)  # further passes (the refund's own events) refund nothing more
    assert refunded() == paid.amount_paid - usage
