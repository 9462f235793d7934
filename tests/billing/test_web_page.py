"""The billing page (service/web) drives the real engine: a signed-up user subscribes, manages
billing and buys a top-up from the page, through Stripe (the fake) and back."""
from __future__ import annotations

import uuid

import pytest

from ..web_support import Browserish
from .conftest import events_settled, one, start_billing_bridge, stripe_sync
from .test_checkout import session_id


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    assert stripe_sync(database, fake).returncode == 0
    # the page's own address (an https public URL would make its cookies Secure, not sent over http)
    server = start_billing_bridge(database, simulator, fake, CODEPLAN_PUBLIC_URL="")
    yield server
    server.stop()


def test_subscribe_manage_and_top_up_from_the_page(database, fake, service):
    browser = Browserish(service.url)
    address = f"{uuid.uuid4().hex[:10]}@example.com"
    assert browser.sign_up(address).status_code == 200
    account = one(database, "SELECT id FROM accounts WHERE lower(email) = lower($1)", address)[0]
    page = browser.get("/billing")
    assert "Billing is off" not in page.text
    moved = browser.post("/billing/checkout", {"plan": "pro"}, follow_redirects=False)
    assert moved.status_code == 303 and moved.headers["location"].startswith(fake.url + "/c/pay/cs_test_")
    session = fake.client().v1.checkout.sessions.retrieve(session_id(moved.headers["location"]))
    assert session.client_reference_id == str(account)
    assert session.success_url.startswith(service.url + "/billing?checkout=success")
    assert browser.get(session.success_url.replace("{CHECKOUT_SESSION_ID}", session.id)).status_code == 200
    fake.complete_checkout(session.id)
    events_settled(database, fake)
    assert one(database, "SELECT plan_id, status FROM subscriptions WHERE account_id = $1", account) == ("pro", "active")

    page = browser.get("/billing")
    assert "20,000,000 tokens, 10.00 USD" in page.text  # the blocks on sale, named by the engine
    portal = browser.post("/billing/portal", {}, follow_redirects=False)
    assert portal.status_code == 303 and portal.headers["location"].startswith(fake.url + "/p/session/")
    topup = browser.post("/billing/topup", {"block": "20000000"}, follow_redirects=False)
    assert topup.status_code == 303 and topup.headers["location"].startswith(fake.url + "/c/pay/")
    fake.complete_checkout(session_id(topup.headers["location"]))
    events_settled(database, fake)
    assert one(database, "SELECT tokens FROM topups WHERE account_id = $1", account)[0] == 20_000_000
    browser.close()
