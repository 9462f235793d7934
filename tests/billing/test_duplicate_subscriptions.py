"""One account, one paid subscription (review finding 8): a new Checkout expires the account's
other open ones, and a second subscription paid all the same is cancelled on Stripe and what it
charged refunded, by the billing worker."""
from __future__ import annotations

import httpx
import pytest

from ..conftest import query, run
from .conftest import events_settled, new_account, one, start_billing_bridge, stripe_sync, wait_for
from .test_checkout import post, session_id


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    result = stripe_sync(database, fake)
    assert result.returncode == 0, result.stderr
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


def checkout(service, key: str, plan: str) -> str:
    response = post(service, "/v1/billing/checkout", key, {"plan": plan})
    assert response.status_code == 200, response.text
    return session_id(response.json()["url"])


def test_a_new_checkout_expires_the_accounts_other_open_one(database, fake, service):
    account, key = new_account(database)
    lite = checkout(service, key, "lite")
    pro = checkout(service, key, "pro")  # another tab, another plan
    assert pro != lite
    client = fake.client()
    assert client.v1.checkout.sessions.retrieve(lite).status == "expired"
    assert client.v1.checkout.sessions.retrieve(pro).status == "open"
    # the expired one can no longer be paid; the open one can
    with pytest.raises(AssertionError, match="expired"):
        fake.complete_checkout(lite)
    fake.complete_checkout(pro)
    events_settled(database, fake)
    rows = [tuple(r) for r in run(query(database, "SELECT plan_id, status FROM subscriptions WHERE account_id = $1",
                                        account))]
    assert rows == [("pro", "active")]
    customer = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", account)[0]
    assert len(client.v1.subscriptions.list({"customer": customer}).data) == 1


def test_a_checkout_is_refused_when_stripe_already_has_a_paid_subscription(database, fake, simulator):
    """Paid on Stripe, its webhook not here yet: our mirror knows nothing, Stripe does."""
    server = start_billing_bridge(database, simulator, fake, endpoint=False)
    try:
        account, key = new_account(database)
        first = checkout(server, key, "lite")
        fake.complete_checkout(first)  # no endpoint: nothing reaches Codeplan
        again = post(server, "/v1/billing/checkout", key, {"plan": "pro"})
        assert again.status_code == 409 and "billing portal" in again.json()["detail"], again.text
        customer = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", account)[0]
        opened = fake.client().v1.checkout.sessions.list({"customer": customer, "status": "open"}).data
        assert opened == []  # the session made for the refused checkout was withdrawn
    finally:
        server.stop()


def test_a_second_paid_subscription_is_cancelled_and_refunded(database, fake, service):
    account, key = new_account(database)
    kept = checkout(service, key, "lite")
    customer = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", account)[0]
    client = fake.client()
    # a session opened outside this rule (an older Codeplan, a stale tab): both get paid
    price = one(database, "SELECT stripe_price_id FROM stripe_prices WHERE lookup_key = 'codeplan_pro_month'"
                          " AND current")[0]
    meta = {"codeplan_account_id": str(account), "codeplan_plan": "pro"}
    stray = client.v1.checkout.sessions.create({
        "mode": "subscription", "customer": customer, "client_reference_id": str(account),
        "line_items": [{"price": price, "quantity": 1}], "metadata": meta,
        "subscription_data": {"metadata": meta}, "success_url": "https://codeplan.example/billing",
        "cancel_url": "https://codeplan.example/billing"})
    fake.complete_checkout(kept)
    events_settled(database, fake)
    fake.complete_checkout(stray.id)
    events_settled(database, fake)
    kept_sub = client.v1.checkout.sessions.retrieve(kept).subscription
    stray_sub = client.v1.checkout.sessions.retrieve(stray.id).subscription

    def undone():
        row = one(database, "SELECT * FROM duplicate_subscriptions WHERE stripe_subscription_id = $1", stray_sub)
        return row if row is not None and row["state"] != "pending" else None
    row = wait_for(undone, what="duplicate subscription undone")
    assert (row["state"], row["account_id"], row["kept_subscription_id"], row["refunded_amount"]) == \
        ("done", account, kept_sub, 3000)

    # on Stripe: the stray subscription ended, its one payment refunded in full as a duplicate
    assert client.v1.subscriptions.retrieve(stray_sub).status == "canceled"
    invoices = client.v1.invoices.list({"subscription": stray_sub}).data
    assert [i.amount_paid for i in invoices] == [3000]
    refunds = [r for r in fake.requests("/v1/refunds") if r["method"] == "POST" and r["status"] == 200]
    mine = [r for r in refunds if r["params"].get("metadata", {}).get("codeplan_account_id") == str(account)]
    assert len(mine) == 1 and mine[0]["params"]["reason"] == "duplicate"
    assert mine[0]["idempotency_key"].startswith("codeplan-")
    assert client.v1.subscriptions.retrieve(kept_sub).status == "active"
    events_settled(database, fake)
    # the account still runs on the subscription it kept, and only that one
    sub = one(database, "SELECT plan_id, status, stripe_subscription_id FROM subscriptions"
                        " WHERE account_id = $1 AND status <> 'canceled'", account)
    assert tuple(sub) == ("lite", "active", kept_sub)
    state = httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {key}"}, timeout=60).json()
    assert state["subscription"]["plan"] == "lite"
