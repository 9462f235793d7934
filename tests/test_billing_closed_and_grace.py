"""A closed account is never charged for what it can no longer use, and an unpaid renewal always
has its grace (migrations/0059, service/billing/apply.py, sessions.py, duplicates.py):

- a closed account cannot open a Checkout, a Portal or a top-up (403 `account_closed`);
- a subscription or a top-up paid through a Checkout opened before the close (its page stays
  payable for 24 hours) is undone as a duplicate subscription is: cancelled on Stripe at once,
  every payment refunded, never served (no live subscription, no top-up window);
- a close and a subscription applied at once end refused-close or undone, never served-and-closed;
- a renewal left unpaid after a declined upgrade (unpaid, or forgiven), whose failure is long past
  the grace, gets a grace of its own, counted from the renewal's failure, then is suspended.

Real servers throughout: the bridge, PostgreSQL, the Stripe fake driven by the `stripe` library.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import uuid

import asyncpg
import httpx
import pytest

from .billing.conftest import (events_settled, fake, new_account, one, start_billing_bridge,  # noqa: F401
                               stripe_sync, wait_for)
from .billing.test_checkout import post, session_id
from .billing.test_lifecycle import Subscriber
from .billing.test_unpaid_changes import grace_over
from .conftest import query, run
from .test_billing_declined_upgrades import declined_upgrade, kept
from .web_support import PASSWORD, Browserish

DAY = 86400


@pytest.fixture(scope="module")
def service(database, simulator, fake):  # noqa: F811
    assert stripe_sync(database, fake).returncode == 0
    # Stripe set to leave a subscription past_due after its retries: nothing but Codeplan's grace
    # then ends what is unpaid (a declined upgrade's retries would otherwise cancel it first)
    fake.settings(retry_delays=[3 * DAY, 5 * DAY, 7 * DAY], after_retries="past_due")
    # the page's own address (an https public URL would make its cookies Secure, not sent over
    # http); a sign-up gets an operator's plan, which closing ends (one paid through Stripe refuses
    # it); a key looked up is held as long as a test needs it (CODEPLAN_AUTH_CACHE_TTL)
    server = start_billing_bridge(database, simulator, fake, CODEPLAN_PUBLIC_URL="", CODEPLAN_SIGNUP_PLAN="lite",
                                  CODEPLAN_AUTH_CACHE_TTL="300")
    yield server
    server.stop()


def member(database: str, service) -> tuple[Browserish, str, int]:
    """A person signed up on the page (no mail configured: nothing to confirm), on the operator's lite."""
    browser = Browserish(service.url)
    address = f"cl{uuid.uuid4().hex[:10]}@example.com"
    assert browser.sign_up(address).status_code == 200
    account = one(database, "SELECT id FROM accounts WHERE lower(email) = lower($1)", address)[0]
    return browser, address, account


def close(browser: Browserish, address: str) -> httpx.Response:
    browser.get("/account")
    return browser.post("/account/close", {"password": PASSWORD, "confirm": address}, follow_redirects=False)


def buy_on_page(browser: Browserish, path: str, form: dict) -> str:
    """The Checkout Session a page's button opens (its id)."""
    browser.get("/billing")
    moved = browser.post(path, form, follow_redirects=False)
    assert moved.status_code == 303, moved.text
    return session_id(moved.headers["location"])


def undone(database: str, ident: str):
    row = one(database, "SELECT * FROM duplicate_subscriptions WHERE stripe_subscription_id = $1", ident)
    return row if row is not None and row["state"] != "pending" else None


def live_subscriptions(database: str, account: int) -> list[tuple]:
    return [tuple(r) for r in run(query(database, "SELECT plan_id, stripe_subscription_id FROM subscriptions"
                                                  " WHERE account_id = $1 AND status <> 'canceled'", account))]


# ---- 1. a closed account is charged for nothing ------------------------------------------------

def test_a_closed_account_cannot_open_a_checkout_a_portal_or_a_top_up(database, fake, service):  # noqa: F811
    """Closing revokes the keys, but a key a bridge still holds (CODEPLAN_AUTH_CACHE_TTL), looked
    up before the close, may still ask: each is refused in the API's shape, and nothing is opened
    on Stripe."""
    account, key = new_account(database)
    run(query(database, "INSERT INTO subscriptions (account_id, plan_id, status) VALUES ($1, 'lite', 'active')",
              account))
    # its Customer made, and its key held by the bridge from here
    assert post(service, "/v1/billing/checkout", key, {"plan": "pro"}).status_code == 200
    customer = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", account)[0]
    # closed as identity.close_account closes it: the key revoked, the bridge still holding it
    run(query(database, "UPDATE api_keys SET revoked_at = now() WHERE account_id = $1", account))
    run(query(database, "UPDATE accounts SET closed_at = now() WHERE id = $1", account))
    before = len(fake.client().v1.checkout.sessions.list({"customer": customer, "limit": 100}).data)
    for path, body in (("/v1/billing/checkout", {"plan": "pro"}), ("/v1/billing/topup", {"block": "20000000"}),
                       ("/v1/billing/portal", None)):
        refused = post(service, path, key, body)
        assert refused.status_code == 403, (path, refused.text)
        problem = refused.json()
        assert problem["code"] == "account_closed" and "closed" in problem["detail"], problem
        assert refused.headers["content-type"].startswith("application/problem+json")
    assert len(fake.client().v1.checkout.sessions.list({"customer": customer, "limit": 100}).data) == before
    assert not [r for r in fake.requests("/v1/billing_portal/sessions") if r["status"] == 200
                and r["params"].get("customer") == customer]


def test_a_checkout_and_a_top_up_paid_after_the_close_are_undone(database, fake, service):  # noqa: F811
    """Both pages opened, then the account closed (an operator's plan: closing is allowed), then
    both paid within their 24 hours. The subscription is cancelled on Stripe at once and its
    payment refunded; the top-up's payment refunded; neither is served."""
    browser, address, account = member(database, service)
    plan_session = buy_on_page(browser, "/billing/checkout", {"plan": "pro"})
    topup_session = buy_on_page(browser, "/billing/topup", {"block": "20000000"})
    closed = close(browser, address)
    assert closed.status_code == 200 and "Your account is closed" in closed.text
    assert one(database, "SELECT closed_at FROM accounts WHERE id = $1", account)[0] is not None

    fake.complete_checkout(plan_session)
    fake.complete_checkout(topup_session)
    events_settled(database, fake)
    client = fake.client()
    subscription = client.v1.checkout.sessions.retrieve(plan_session).subscription
    intent = client.v1.checkout.sessions.retrieve(topup_session).payment_intent

    row = wait_for(lambda: undone(database, subscription), 60, what="the closed account's subscription undone")
    assert (row["state"], row["reason"], row["account_id"], row["kept_subscription_id"], row["refunded_amount"]) == \
        ("done", "account_closed", account, None, 3000), dict(row)
    assert client.v1.subscriptions.retrieve(subscription).status == "canceled"
    for invoice in client.v1.invoices.list({"subscription": subscription}).data:
        assert kept(fake, invoice.id) == 0
    row = wait_for(lambda: undone(database, intent), 60, what="the closed account's top-up refunded")
    assert (row["state"], row["reason"], row["stripe_object"], row["refunded_amount"]) == \
        ("done", "account_closed", "payment_intent", 1000), dict(row)
    charge = client.v1.charges.retrieve(client.v1.payment_intents.retrieve(intent).latest_charge)
    assert charge.amount_refunded == charge.amount == 1000
    refunds = [r for r in fake.requests("/v1/refunds") if r["method"] == "POST" and r["status"] == 200
               and r["params"].get("metadata", {}).get("codeplan_account_id") == str(account)]
    assert len(refunds) == 2 and all(r["params"]["reason"] == "requested_by_customer" for r in refunds), refunds
    assert all(r["idempotency_key"].startswith("codeplan-") for r in refunds)

    # never served: no live subscription, no block, whatever the events still to come say
    events_settled(database, fake)
    time.sleep(1.5)  # a worker pass more
    assert live_subscriptions(database, account) == []
    assert one(database, "SELECT count(*) FROM topups WHERE account_id = $1", account)[0] == 0
    assert one(database, "SELECT count(*) FROM quota_windows q JOIN subscriptions s ON s.id = q.subscription_id"
                         " WHERE s.account_id = $1 AND q.kind = 'topup'", account)[0] == 0
    assert len([r for r in fake.requests("/v1/refunds") if r["method"] == "POST" and r["status"] == 200
                and r["params"].get("metadata", {}).get("codeplan_account_id") == str(account)]) == 2


def _apply_args(account: int, ident: str, price: str) -> tuple:
    now = dt.datetime.now(dt.timezone.utc)
    return (ident, account, f"cus_{ident}", "active", "pro", price, now, now + dt.timedelta(days=30), False,
            False, None, None, 3600.0)


_APPLY = "SELECT * FROM billing_apply_subscription($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"


async def _waiting_for_a_lock(conn: asyncpg.Connection) -> None:
    for _ in range(400):
        if await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                               " AND wait_event_type = 'Lock'"):
            return
        await asyncio.sleep(0.025)
    raise AssertionError("nobody waited for the lock")


def test_a_close_and_a_subscription_applied_at_once_never_leave_it_served_and_closed(database, service):
    """The two orders of the account row's lock, which both take first. A subscription applied
    while a close waits: the close is refused. A close committed while the apply waits: the
    subscription is refused ('closed', for the worker to undo), and no live row is made."""
    price = one(database, "SELECT stripe_price_id FROM stripe_prices WHERE lookup_key = 'codeplan_pro_month'"
                          " AND current")[0]
    browser, address, account = member(database, service)

    async def apply_first() -> httpx.Response:
        conn = await asyncpg.connect(database)
        try:
            async with conn.transaction():
                row = await conn.fetchrow(_APPLY, *_apply_args(account, f"sub_race{uuid.uuid4().hex[:10]}", price))
                assert row["outcome"] == "applied", dict(row)
                answer: list[httpx.Response] = []
                closing = threading.Thread(target=lambda: answer.append(close(browser, address)))
                closing.start()
                await _waiting_for_a_lock(conn)
            closing.join(60)
            return answer[0]
        finally:
            await conn.close()
    refused = run(apply_first())
    assert refused.status_code == 409 and "cancel it in the billing portal first" in refused.text
    assert one(database, "SELECT closed_at FROM accounts WHERE id = $1", account)[0] is None

    other, _ = new_account(database)
    ident = f"sub_race{uuid.uuid4().hex[:10]}"

    async def close_first():
        closer, applier = await asyncpg.connect(database), await asyncpg.connect(database)
        try:
            async with closer.transaction():
                # what identity.close_account does under the account's lock
                await closer.execute("SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE", other)
                await closer.execute("UPDATE accounts SET closed_at = now() WHERE id = $1", other)
                applying = asyncio.ensure_future(applier.fetchrow(_APPLY, *_apply_args(other, ident, price)))
                await _waiting_for_a_lock(closer)
            return await asyncio.wait_for(applying, 30)
        finally:
            await closer.close()
            await applier.close()
    row = run(close_first())
    assert row["outcome"] == "closed", dict(row)
    assert live_subscriptions(database, other) == []
    assert one(database, "SELECT subscription_id FROM stripe_subscriptions WHERE stripe_subscription_id = $1",
               ident)[0] is None


# ---- 2. an unpaid renewal's grace counts from the renewal ------------------------------------

def billing_state(service, user: Subscriber) -> dict:
    return httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {user.key}"}).json()


@pytest.mark.parametrize("forgiven", [False, True])
def test_a_renewal_unpaid_long_after_a_declined_upgrade_has_its_grace(database, fake, service,  # noqa: F811
                                                                      forgiven):
    """lite paid; an upgrade to max declined, the grace long over (lite kept: only the upgrade is
    unpaid), the upgrade left unpaid or forgiven (its invoice voided). Then the renewal's payment
    fails: Stripe has said past_due since the upgrade, but what is owed now, the renewal, began
    now: it is served through a grace of its own, counted from its failure, then suspended."""
    user = Subscriber(database, fake, service, "lite")
    assert user.chat() == 200
    fake.advance(5 * DAY)
    upgrade = declined_upgrade(user)
    grace_over(database, user)  # the upgrade failed longer ago than CODEPLAN_PAST_DUE_GRACE
    time.sleep(2.5)  # the worker's grace pass runs every second: only an upgrade is unpaid
    assert user.row()["status"] == "active"
    if forgiven:
        fake.client().v1.invoices.void_invoice(upgrade["stripe_invoice_id"])
        user.settle()

    end = user.stripe()["items"].data[0].current_period_end
    fake.advance(end - fake.now() + 60)  # the renewal, declined
    user.settle()
    assert user.stripe().status == "past_due"
    assert user.open_invoice()["billing_reason"] == "subscription_cycle"
    time.sleep(2.5)  # a grace pass or two
    row = user.row()
    assert (row["status"], row["refusal"]) == ("active", None), dict(row)
    left = (row["grace_until"] - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 3000 < left <= 3600, left  # CODEPLAN_PAST_DUE_GRACE from the renewal's failure
    assert user.chat() == 200
    shown = billing_state(service, user)["subscription"]["grace_until"]
    assert shown is not None  # shown to the second
    assert abs((dt.datetime.fromisoformat(shown.replace("Z", "+00:00")) - row["grace_until"]).total_seconds()) < 1

    # a retry of the renewal that fails again is the same arrears: the same grace
    fake.advance(3 * DAY + 60)
    user.settle()
    assert user.row()["grace_until"] == row["grace_until"]

    grace_over(database, user)
    wait_for(lambda: user.row()["status"] == "past_due", 30, what="suspension once the renewal's grace is over")
    assert user.row()["refusal"] == "past_due"
