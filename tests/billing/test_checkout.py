"""Catalogue, Checkout, Portal and top-up sessions, end to end: the real `stripe` library against
the fake, webhooks delivered by the fake to a running Codeplan, allowance in the database."""
from __future__ import annotations

import re
import subprocess
import urllib.parse

import httpx
import openai
import pytest

from ..conftest import CODEPLAN, ROOT, base_env, new_user, query, run, settled_query
from .conftest import billing_env, events_settled, new_account, one, start_billing_bridge, stripe_sync


@pytest.fixture(scope="module")
def synced(database, fake):
    result = stripe_sync(database, fake)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def service(database, simulator, fake, synced):
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


def session_id(url: str) -> str:
    match = re.search(r"/c/pay/(cs_test_\w+)$", url)
    assert match, url
    return match.group(1)


def post(service, path: str, key: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(service.url + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)


# ---- catalogue ----------------------------------------------------------------------------

def test_sync_puts_every_plan_on_sale_with_lookup_keys_and_metadata(database, fake, synced):
    prices = {p.lookup_key: p for p in fake.client().v1.prices.list({"limit": 100, "active": True}).data}
    assert prices["codeplan_pro_month"].unit_amount == 3000 and prices["codeplan_pro_year"].unit_amount == 30000
    assert prices["codeplan_lite_month"].unit_amount == 600 and "codeplan_lite_year" not in prices
    assert prices["codeplan_pro_month"].metadata["codeplan_plan"] == "pro"
    assert prices["codeplan_pro_month"].product == "codeplan_pro"
    overage = prices["codeplan_overage_month"]
    assert overage.recurring.usage_type == "metered" and str(overage.unit_amount_decimal) == "0.00015"
    meter = fake.client().v1.billing.meters.retrieve(overage.recurring.meter)
    assert meter.event_name == "codeplan_overage_tokens" and meter.default_aggregation.formula == "sum"
    assert prices["codeplan_topup_20000000"].unit_amount == 1000
    assert prices["codeplan_topup_20000000"].metadata["codeplan_topup_tokens"] == "20000000"
    product = fake.client().v1.products.retrieve("codeplan_max")
    assert product.metadata["window_tokens"] == "800000000"
    recorded = {r["lookup_key"]: r for r in run(query(database, "SELECT * FROM stripe_prices WHERE current"))}
    assert set(recorded) == set(k for k in prices if k.startswith("codeplan_"))
    assert recorded["codeplan_pro_month"]["stripe_price_id"] == prices["codeplan_pro_month"].id
    assert one(database, "SELECT stripe_meter_id FROM stripe_meters")["stripe_meter_id"] == meter.id


def test_sync_twice_changes_nothing_and_a_new_amount_replaces_the_price(database, fake, synced):
    before = {p.id for p in fake.client().v1.prices.list({"limit": 100}).data}
    again = stripe_sync(database, fake)
    assert again.returncode == 0 and again.stdout.strip().endswith("0 change(s) on Stripe"), again.stdout
    assert {p.id for p in fake.client().v1.prices.list({"limit": 100}).data} == before
    # lite goes up: a new price takes the lookup key, the old one is archived, both stay mapped
    old = one(database, "SELECT stripe_price_id FROM stripe_prices WHERE lookup_key = 'codeplan_lite_month'")[0]
    changed = stripe_sync(database, fake, CODEPLAN_PLAN_PRICES="lite=700,pro=3000/30000,max=6000/60000")
    assert changed.returncode == 0 and "codeplan_lite_month" in changed.stdout and "replaced" in changed.stdout
    new = fake.client().v1.prices.list({"lookup_keys": ["codeplan_lite_month"]}).data[0]
    assert new.unit_amount == 700 and new.id != old
    assert fake.client().v1.prices.retrieve(old).active is False
    rows = run(query(database, "SELECT stripe_price_id, current, plan_id FROM stripe_prices"
                               " WHERE lookup_key = 'codeplan_lite_month' ORDER BY current"))
    assert [(r["stripe_price_id"], r["current"], r["plan_id"]) for r in rows] == [(old, False, "lite"), (new.id, True, "lite")]
    assert one(database, "SELECT monthly_price_cents FROM plans WHERE id = 'lite'")[0] == 700
    back = stripe_sync(database, fake)  # and back, so the other tests see the default catalogue
    assert back.returncode == 0


def test_sync_refuses_plans_the_table_does_not_have(database, fake):
    result = stripe_sync(database, fake, CODEPLAN_OVERAGE_PLANS="gold")
    assert result.returncode == 1 and "plan 'gold' is configured but not in the plans table" in result.stderr


def test_sync_without_a_key_says_so():
    result = subprocess.run(CODEPLAN + ["stripe", "sync"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env=base_env(CODEPLAN_DATABASE_URL="postgresql://nobody@127.0.0.1:1/x"))
    assert result.returncode == 2 and "STRIPE_SECRET_KEY is required" in result.stderr


# ---- checkout to allowance ----------------------------------------------------------------

def test_checkout_to_allowance_end_to_end(database, fake, service):
    account, key = new_account(database)
    # no subscription yet: the key is known but cannot spend
    assert one(database, "SELECT count(*) FROM subscriptions WHERE account_id = $1", account)[0] == 0
    response = post(service, "/v1/billing/checkout", key, {"plan": "pro"})
    assert response.status_code == 200, response.text
    url = response.json()["url"]
    session = fake.client().v1.checkout.sessions.retrieve(session_id(url))
    assert session.mode == "subscription" and session.client_reference_id == str(account)
    assert session.success_url.startswith("https://codeplan.example/billing?checkout=success")
    assert session.cancel_url == "https://codeplan.example/billing?checkout=canceled"
    customer = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", account)[0]
    assert session.customer == customer and customer.startswith("cus_")
    assert fake.client().v1.customers.retrieve(customer).metadata["codeplan_account_id"] == str(account)

    fake.complete_checkout(session.id)  # the buyer pays on Stripe's page
    events_settled(database, fake)
    sub = one(database, "SELECT s.*, m.status AS stripe_status, m.stripe_subscription_id AS sid"
                        " FROM subscriptions s JOIN stripe_subscriptions m ON m.subscription_id = s.id"
                        " WHERE s.account_id = $1", account)
    assert (sub["plan_id"], sub["status"], sub["stripe_status"]) == ("pro", "active", "active")
    stripe_sub = fake.client().v1.subscriptions.retrieve(sub["sid"])
    assert sub["stripe_subscription_id"] == stripe_sub.id
    # overage is on for pro: the metered price rides along
    assert sorted(i.price.lookup_key for i in stripe_sub["items"].data) == ["codeplan_overage_month", "codeplan_pro_month"]
    invoice = one(database, "SELECT * FROM billing_invoices WHERE account_id = $1", account)
    assert (invoice["status"], invoice["amount_paid"], invoice["billing_reason"]) == ("paid", 3000, "subscription_create")

    # the key now spends the plan's allowance
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=key, max_retries=0)
    completion = client.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "hi"}])
    assert completion.usage.total_tokens > 0
    rows = settled_query(database, "SELECT state, subscription_id FROM usage_ledger l JOIN subscriptions s"
                                   " ON s.id = l.subscription_id WHERE s.account_id = $1", account)
    assert [r["state"] for r in rows] == ["posted"]
    window = one(database, "SELECT allowance FROM quota_windows WHERE subscription_id = $1 AND kind = '5h'", sub["id"])
    assert window["allowance"] == 160_000_000

    state = httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {key}"}).json()
    assert state["subscription"]["plan"] == "pro" and state["subscription"]["refusal"] is None
    assert state["subscription"]["stripe_status"] == "active" and state["invoices"][0]["amount_paid"] == 3000

    # subscribed: a second checkout is refused, the Portal is where plans change
    again = post(service, "/v1/billing/checkout", key, {"plan": "max"})
    assert again.status_code == 409 and "billing portal" in again.json()["detail"]
    portal = post(service, "/v1/billing/portal", key)
    assert portal.status_code == 200
    portal_session = [r for r in fake.requests("/v1/billing_portal/sessions") if r["status"] == 200][-1]
    assert portal_session["params"] == {"customer": customer, "return_url": "https://codeplan.example/billing"}
    assert httpx.get(portal.json()["url"]).status_code == 200


def test_customer_is_made_once_and_every_create_has_an_idempotency_key(database, fake, service):
    account, key = new_account(database)
    first_response = post(service, "/v1/billing/checkout", key, {"plan": "lite"})
    assert first_response.status_code == 200, first_response.text
    first = first_response.json()["url"]
    twice = post(service, "/v1/billing/checkout", key, {"plan": "lite"}).json()["url"]
    assert first == twice  # a double click within the hour: the same session
    yearly = post(service, "/v1/billing/checkout", key, {"plan": "max", "interval": "year"}).json()["url"]
    assert yearly != first
    creates = [r for r in fake.requests("/v1/customers") if r["method"] == "POST"
               and r["params"].get("metadata", {}).get("codeplan_account_id") == str(account)]
    assert len(creates) == 1
    customer = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", account)[0]
    sessions = [r for r in fake.requests("/v1/checkout/sessions") if r["method"] == "POST"
                and r["params"].get("customer") == customer]
    assert len(sessions) == 3 and all(r["idempotency_key"].startswith("codeplan-") for r in sessions)
    assert sessions[1].get("replayed") is True  # the second click replayed the first answer
    assert all(r["idempotency_key"].startswith("codeplan-") for r in creates)
    yearly_session = fake.client().v1.checkout.sessions.retrieve(session_id(yearly))
    assert yearly_session.amount_total == 60000


def test_checkout_errors_are_clear_4xx(database, fake, service):
    account, key = new_account(database)
    assert post(service, "/v1/billing/checkout", "cp_nope", {"plan": "pro"}).status_code == 401
    unknown = post(service, "/v1/billing/checkout", key, {"plan": "gold"})
    assert unknown.status_code == 400 and "unknown plan 'gold'" in unknown.json()["detail"]
    not_yearly = post(service, "/v1/billing/checkout", key, {"plan": "lite", "interval": "year"})
    assert not_yearly.status_code == 400 and "not sold yearly" in not_yearly.json()["detail"]
    bad = httpx.post(service.url + "/v1/billing/checkout", content=b"{nope",
                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("application/problem+json")
    assert post(service, "/v1/billing/checkout", key, {"plan": "pro", "interval": "week"}).status_code == 400
    no_portal = post(service, "/v1/billing/portal", key)
    assert no_portal.status_code == 409 and "subscribe" in no_portal.json()["detail"]
    no_plan_topup = post(service, "/v1/billing/topup", key, {"block": "20000000"})
    assert no_plan_topup.status_code == 409 and "subscribe to a plan first" in no_plan_topup.json()["detail"]
    # Stripe failing (after the library's own retries) is a 502 that says to try again, not a 500
    fake.fault("/v1/checkout/sessions", 500, count=3)
    down = post(service, "/v1/billing/checkout", key, {"plan": "pro"})
    assert down.status_code == 502 and "Try again" in down.json()["detail"]
    assert post(service, "/v1/billing/checkout", key, {"plan": "pro"}).status_code == 200


def test_no_secret_reaches_the_log(database, fake, service):
    from ..stripe_fake import API_KEY
    from .conftest import WEBHOOK_SECRET
    account, key = new_account(database)
    assert post(service, "/v1/billing/checkout", "cp_bad_key", {"plan": "pro"}).status_code == 401
    assert post(service, "/v1/billing/checkout", key, {"plan": "pro"}).status_code == 200
    output = service.output()
    assert output and API_KEY not in output and WEBHOOK_SECRET not in output and key not in output
    assert API_KEY[8:] not in output  # not even in part


def test_operator_assigned_subscription_is_adopted_usage_and_all(database, fake, service):
    key = new_user(database, "lite")  # the admin CLI's way: an active lite plan, no Stripe
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model="glm-4.6", messages=[{"role": "user", "content": "hi"}])
    account = one(database, "SELECT k.account_id FROM api_keys k WHERE k.prefix = $1", key[:10])[0]
    local = one(database, "SELECT id FROM subscriptions WHERE account_id = $1", account)["id"]
    used = settled_query(database, "SELECT posted FROM quota_windows WHERE subscription_id = $1 AND kind = '5h'",
                         local)[0]["posted"]
    url = post(service, "/v1/billing/checkout", key, {"plan": "max"}).json()["url"]
    fake.complete_checkout(session_id(url))
    events_settled(database, fake)
    rows = run(query(database, "SELECT id, plan_id, status, stripe_subscription_id FROM subscriptions WHERE account_id = $1",
                     account))
    assert len(rows) == 1 and rows[0]["id"] == local and rows[0]["plan_id"] == "max" and rows[0]["stripe_subscription_id"]
    window = one(database, "SELECT allowance, posted FROM quota_windows WHERE subscription_id = $1 AND kind = '5h'", local)
    assert (window["allowance"], window["posted"]) == (800_000_000, used)  # upgraded at once, usage kept


def test_topup_is_bought_recorded_once_and_a_refund_is_recorded(database, fake, service):
    account, key = new_account(database)
    url = post(service, "/v1/billing/checkout", key, {"plan": "pro"}).json()["url"]
    fake.complete_checkout(session_id(url))
    events_settled(database, fake)
    unknown_block = post(service, "/v1/billing/topup", key, {"block": "123"})
    assert unknown_block.status_code == 400 and "20000000" in unknown_block.json()["detail"]
    response = post(service, "/v1/billing/topup", key, {"block": 20000000})
    assert response.status_code == 200, response.text
    session = fake.client().v1.checkout.sessions.retrieve(session_id(response.json()["url"]))
    assert session.mode == "payment" and session.amount_total == 1000
    fake.complete_checkout(session.id)
    events_settled(database, fake)
    topup = one(database, "SELECT * FROM topups WHERE account_id = $1", account)
    assert (topup["tokens"], topup["amount"], topup["amount_refunded"]) == (20_000_000, 1000, 0)
    days = (topup["expires_at"] - topup["purchased_at"]).total_seconds() / 86400
    assert 364.99 < days < 365.01
    # a redelivery of the same events changes nothing
    events = [e["id"] for e in fake.events() if e["type"] == "checkout.session.completed"
              and e["data"]["object"]["id"] == session.id]
    fake.deliver(events * 3, f"{service.url}/stripe/webhook", ["whsec_codeplan_test_secret_0001"])
    events_settled(database, fake)
    assert one(database, "SELECT count(*) FROM topups WHERE account_id = $1", account)[0] == 1

    refreshed = fake.client().v1.checkout.sessions.retrieve(session.id)
    fake.client().v1.refunds.create({"payment_intent": refreshed.payment_intent, "amount": 400})
    events_settled(database, fake)
    assert one(database, "SELECT amount_refunded FROM topups WHERE account_id = $1", account)[0] == 400
    fake.client().v1.refunds.create({"payment_intent": refreshed.payment_intent})
    events_settled(database, fake)
    topup = one(database, "SELECT * FROM topups WHERE account_id = $1", account)
    assert topup["amount_refunded"] == 1000 and topup["refunded_at"] is not None
    state = httpx.get(service.url + "/v1/billing", headers={"authorization": f"Bearer {key}"}).json()
    assert state["topups"][0]["amount_refunded"] == 1000
    assert [b["id"] for b in state["topup_blocks"]] == ["20000000", "100000000"]


def test_a_second_installation_on_the_same_stripe_account_takes_none_of_our_purchases(
        database, fresh_database, simulator, fake, service):
    """A staging copy (or a second database) pointed at the same Stripe account receives every
    event too. Its account ids overlap ours: a purchase of our account 7 must not become its
    account 7's plan or top-up."""
    account, key = new_account(database)
    other = fresh_database
    assert stripe_sync(other, fake).returncode == 0
    run(query(other, "INSERT INTO accounts (id, email) OVERRIDING SYSTEM VALUE VALUES ($1, 'twin@example.com')",
              account))
    # an installation of its own (the test databases are clones of one template, which share it)
    run(query(other, "UPDATE billing_installation SET id = gen_random_uuid()"))
    twin = start_billing_bridge(other, simulator, fake)  # its endpoint gets every event as well
    try:
        response = post(service, "/v1/billing/checkout", key, {"plan": "pro"})
        assert response.status_code == 200, response.text
        fake.complete_checkout(session_id(response.json()["url"]))
        events_settled(database, fake)
        response = post(service, "/v1/billing/topup", key, {"block": "20000000"})
        assert response.status_code == 200, response.text
        fake.complete_checkout(session_id(response.json()["url"]))
        events_settled(database, fake)
        events_settled(other, fake)
        assert one(database, "SELECT plan_id FROM subscriptions WHERE account_id = $1", account)[0] == "pro"
        assert one(database, "SELECT tokens FROM topups WHERE account_id = $1", account)[0] == 20_000_000
        # the other installation received the same events, and applied none of them to its account
        assert one(other, "SELECT count(*) FROM stripe_events WHERE type = 'checkout.session.completed'")[0] >= 2
        assert one(other, "SELECT stripe_customer_id FROM accounts WHERE id = $1", account)[0] is None
        assert one(other, "SELECT count(*) FROM subscriptions WHERE account_id = $1", account)[0] == 0
        assert one(other, "SELECT count(*) FROM topups WHERE account_id = $1", account)[0] == 0
    finally:
        twin.stop()
