"""The billing page a paying customer lives with: a Stripe subscriber's plan change goes to Stripe's
portal (Checkout refuses a second subscription, which the page told as "try again in a moment"),
and a failed payment that suspends every request is said on the page the 402 points to."""
from __future__ import annotations

import re
import uuid

import pytest

from tests.billing.conftest import events_settled, fake, one, start_billing_bridge, stripe_sync, wait_for  # noqa: F401
from tests.billing.test_checkout import session_id
from tests.conftest import settled_query
from tests.web_support import Browserish

DAY = 86400


@pytest.fixture(scope="module")
def service(database, simulator, fake):  # noqa: F811
    assert stripe_sync(database, fake).returncode == 0
    server = start_billing_bridge(database, simulator, fake, CODEPLAN_PUBLIC_URL="")
    yield server
    server.stop()


def subscribed(database, fake, service, plan="pro"):  # noqa: F811
    browser = Browserish(service.url)
    address = f"{uuid.uuid4().hex[:10]}@example.com"
    assert browser.sign_up(address).status_code == 200
    account = one(database, "SELECT id FROM accounts WHERE lower(email) = lower($1)", address)[0]
    moved = browser.post("/billing/checkout", {"plan": plan}, follow_redirects=False)
    fake.complete_checkout(session_id(moved.headers["location"]))
    events_settled(database, fake)
    return browser, account


def test_a_stripe_subscribers_plan_change_goes_to_the_portal(database, fake, service):  # noqa: F811
    browser, _ = subscribed(database, fake, service)
    page = browser.get("/billing").text
    forms = re.findall(r'<form method="post" action="([^"]+)">\s*<input type="hidden" name="_csrf_token"[^>]*>\s*'
                       r'<input type="hidden" name="plan" value="(\w+)">', page)
    assert forms and all(action == "/billing/portal" for action, _ in forms), forms
    moved = browser.post("/billing/portal", {"plan": "max"}, follow_redirects=False)
    assert moved.status_code == 303 and "notice=" not in moved.headers["location"], moved.headers


def test_the_page_the_402_points_to_says_the_payment_failed_and_where_to_pay(database, fake, service):  # noqa: F811
    fake.settings(retry_delays=[3 * DAY, 5 * DAY, 7 * DAY], after_retries="canceled")
    browser, account = subscribed(database, fake, service)
    assert "Your last payment failed" not in browser.get("/billing").text
    customer = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", account)[0]
    fake.payment_behavior(customer, "decline")
    fake.advance(32 * DAY)
    events_settled(database, fake)
    page = browser.get("/billing").text
    assert "Your last payment failed. Pay it before this time (UTC)" in page  # in its grace
    settled_query(database, "UPDATE stripe_subscriptions SET grace_until = now() - interval '1 second'"
                            " WHERE account_id = $1 RETURNING 1", account)
    wait_for(lambda: one(database, "SELECT status FROM subscriptions WHERE account_id = $1 ORDER BY id DESC LIMIT 1",
                         account)[0] == "past_due", 30, what="suspended")
    page = browser.get("/billing").text
    assert "requests are refused until it is paid" in page
    url = one(database, "SELECT hosted_invoice_url FROM billing_invoices WHERE account_id = $1 AND status = 'open'"
                        " ORDER BY created_at DESC LIMIT 1", account)[0]
    assert url and f'href="{url}"' in page
