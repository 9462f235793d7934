"""The fake answers the real `stripe` library as Stripe does; the other billing tests rely on it."""
from __future__ import annotations

import json
import time
import urllib.parse

import httpx
import pytest
import stripe

from service.billing.stripe_api import STRIPE_API_VERSION

from ..stripe_fake import signature_header
from .conftest import WEBHOOK_SECRET


def test_pinned_api_version_is_the_librarys(fake):
    from stripe._api_version import _ApiVersion
    # bump STRIPE_API_VERSION with the library, after reading Stripe's changelog
    assert STRIPE_API_VERSION == _ApiVersion.CURRENT


def test_idempotency_keys_as_stripe_honours_them(fake):
    client = fake.client()
    first = client.v1.customers.create({"email": "a@example.com"}, {"idempotency_key": "k-same"})
    again = client.v1.customers.create({"email": "a@example.com"}, {"idempotency_key": "k-same"})
    assert again.id == first.id
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert again.last_response.headers["Original-Request"] == first.last_response.request_id
    with pytest.raises(stripe.IdempotencyError) as other_params:
        client.v1.customers.create({"email": "b@example.com"}, {"idempotency_key": "k-same"})
    assert "same parameters" in other_params.value.user_message
    with pytest.raises(stripe.IdempotencyError) as other_endpoint:
        client.v1.products.create({"name": "x"}, {"idempotency_key": "k-same"})
    assert "same endpoint" in other_endpoint.value.user_message
    # without a key, two creates are two customers
    assert client.v1.customers.create({"email": "a@example.com"}).id != first.id


def test_errors_come_in_stripes_envelope_with_a_request_id(fake):
    response = httpx.post(fake.url + "/v1/prices", headers={"Authorization": f"Bearer {fake.api_key}"},
                          data={"currency": "usd", "product": "prod_missing", "unit_amount": "5"})
    assert response.status_code == 400 and response.headers["Request-Id"].startswith("req_")
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "resource_missing"
    assert error["param"] == "product" and "No such product" in error["message"]
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        fake.client().v1.customers.create({"emial": "typo@example.com"})
    assert unknown.value.code == "parameter_unknown" and unknown.value.param == "emial"
    with pytest.raises(stripe.AuthenticationError):
        stripe.StripeClient("sk_test_wrong_key_0000", base_addresses={"api": fake.url}).v1.customers.create({})


def test_requests_arrive_form_encoded_with_the_pinned_version(fake):
    client = stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url}, stripe_version=STRIPE_API_VERSION)
    product = client.v1.products.create({"name": "Encoded", "metadata": {"a": "1"}})
    client.v1.prices.create({"product": product.id, "currency": "usd", "unit_amount": 100,
                             "recurring": {"interval": "month"}, "lookup_key": f"enc_{product.id}"})
    logged = [r for r in fake.requests("/v1/prices") if r["method"] == "POST"][-1]
    assert logged["content_type"] == "application/x-www-form-urlencoded"
    assert logged["stripe_version"] == STRIPE_API_VERSION
    assert logged["idempotency_key"]  # the library adds one to every POST
    body = urllib.parse.parse_qs(logged["body"])
    assert body["recurring[interval]"] == ["month"] and body["unit_amount"] == ["100"]


def test_meter_event_identifiers_dedupe_and_429_is_injectable(fake):
    client = fake.client()
    customer = client.v1.customers.create({"email": "m@example.com"})
    client.v1.billing.meters.create({"display_name": "t", "event_name": "fake_test_tokens",
                                     "default_aggregation": {"formula": "sum"}})
    params = {"event_name": "fake_test_tokens", "identifier": "id-1",
              "payload": {"stripe_customer_id": customer.id, "value": "7"}}
    client.v1.billing.meter_events.create(params)
    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        client.v1.billing.meter_events.create(params)
    assert duplicate.value.http_status == 400 and "already exists with identifier id-1" in duplicate.value.user_message
    fake.fault("/v1/billing/meter_events", 429, type="invalid_request_error", code="rate_limit",
               message="Request rate limit exceeded.")
    with pytest.raises(stripe.RateLimitError):
        client.v1.billing.meter_events.create(dict(params, identifier="id-2"))
    client.v1.billing.meter_events.create(dict(params, identifier="id-2"))
    assert [e["payload"]["value"] for e in fake.meter_events() if e["event_name"] == "fake_test_tokens"] == ["7", "7"]


def test_events_are_signed_with_stripes_scheme(fake):
    event = fake.events()[-1]
    payload = json.dumps(event)
    header = signature_header(payload, [WEBHOOK_SECRET])
    parsed = stripe.Webhook.construct_event(payload, header, WEBHOOK_SECRET)
    assert parsed.id == event["id"]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, signature_header(payload, ["whsec_other"]), WEBHOOK_SECRET)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, signature_header(payload, [WEBHOOK_SECRET], int(time.time()) - 301),
                                       WEBHOOK_SECRET)


def _subscribed(fake, price_amount: int = 700):
    """A customer with an active monthly subscription, made through a completed Checkout."""
    client = fake.client()
    product = client.v1.products.create({"name": "Delete me"})
    price = client.v1.prices.create({"product": product.id, "currency": "usd", "unit_amount": price_amount,
                                     "recurring": {"interval": "month"}})
    customer = client.v1.customers.create({"email": "gone@example.com"})
    session = client.v1.checkout.sessions.create({
        "mode": "subscription", "customer": customer.id, "line_items": [{"price": price.id, "quantity": 1}],
        "success_url": "https://example.com/ok"})
    fake.complete_checkout(session.id)
    return client, customer, client.v1.checkout.sessions.retrieve(session.id).subscription, price


def test_deleting_a_customer_as_stripe_documents_it(fake):
    """Permanently deleted, its subscriptions cancelled at once (each with its event), then
    customer.deleted; retrieving it answers it deleted; any other use finds no such customer."""
    client, customer, subscription, price = _subscribed(fake)
    before = len(fake.events())
    deleted = client.v1.customers.delete(customer.id)
    assert (deleted.id, deleted.deleted) == (customer.id, True)
    assert client.v1.subscriptions.retrieve(subscription).status == "canceled"
    types = [e["type"] for e in fake.events()[before:]]
    assert types == ["customer.subscription.deleted", "customer.deleted"]
    assert fake.events()[-1]["data"]["object"]["id"] == customer.id
    again = httpx.get(f"{fake.url}/v1/customers/{customer.id}", headers={"Authorization": f"Bearer {fake.api_key}"})
    assert again.status_code == 200 and again.json() == {"id": customer.id, "object": "customer", "deleted": True}
    with pytest.raises(stripe.InvalidRequestError) as session:
        client.v1.checkout.sessions.create({
            "mode": "subscription", "customer": customer.id, "line_items": [{"price": price.id, "quantity": 1}],
            "success_url": "https://example.com/ok"})
    assert session.value.code == "resource_missing" and session.value.param == "customer"
    with pytest.raises(stripe.InvalidRequestError) as portal:
        client.v1.billing_portal.sessions.create({"customer": customer.id})
    assert portal.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as twice:
        client.v1.customers.delete(customer.id)
    assert twice.value.http_status == 404 and twice.value.code == "resource_missing"


def test_voiding_an_invoice_as_stripe_documents_it(fake):
    """Only an open (or uncollectible) invoice is voided, for good: it can no longer be paid."""
    client, customer, subscription, _ = _subscribed(fake)
    fake.payment_behavior(customer.id, "decline")
    fake.advance(32 * 86400)  # the renewal is declined: its invoice stays open
    renewal = [i for i in client.v1.invoices.list({"subscription": subscription}).data if i.status == "open"][0]
    before = len(fake.events())
    void = client.v1.invoices.void_invoice(renewal.id)
    assert void.status == "void" and void.status_transitions.voided_at is not None
    assert [e["type"] for e in fake.events()[before:]] == ["invoice.voided"]
    fake.payment_behavior(customer.id, "ok")
    with pytest.raises(stripe.InvalidRequestError, match="status void"):
        client.v1.invoices.pay(renewal.id)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.void_invoice(renewal.id)
    paid = [i for i in client.v1.invoices.list({"subscription": subscription}).data if i.status == "paid"][0]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.void_invoice(paid.id)


def _licensed_item(client, subscription: str):
    return client.v1.subscriptions.retrieve(subscription)["items"].data[0]


def test_a_change_of_billing_period_as_stripe_documents_it(fake):
    """Month -> year: the new period starts now (the anchor is reset), invoiced at once
    (subscription_update): the year's price, a line that is no proration, less a proration credit
    for the month's unused time; the update stands though the card declines (past_due)."""
    client, customer, subscription, price = _subscribed(fake, 1000)
    yearly = client.v1.prices.create({"product": price.product, "currency": "usd", "unit_amount": 10000,
                                      "recurring": {"interval": "year"}})
    fake.advance(10 * 86400)
    fake.payment_behavior(customer.id, "decline")
    item = _licensed_item(client, subscription)
    client.v1.subscriptions.update(subscription, {"items": [{"id": item.id, "price": yearly.id}],
                                                  "proration_behavior": "always_invoice"})
    now = fake.now()
    sub = client.v1.subscriptions.retrieve(subscription)
    assert sub.status == "past_due" and abs(sub.billing_cycle_anchor - now) <= 2
    item = sub["items"].data[0]
    assert abs(item.current_period_start - now) <= 2 and item.current_period_end - now > 364 * 86400
    invoice = client.v1.invoices.retrieve(sub.latest_invoice)
    assert (invoice.billing_reason, invoice.status) == ("subscription_update", "open")
    lines = [(line.amount, line.parent.subscription_item_details.proration) for line in invoice.lines.data]
    credit = [amount for amount, proration in lines if proration]
    assert sorted(lines, key=lambda l: l[1]) == [(10000, False), (credit[0], True)] and -1000 < credit[0] < -600
    assert invoice.amount_due == 10000 + credit[0]


def test_a_price_change_within_the_period_bills_prorations_only(fake):
    """Same interval: the credit and the debit for the time left, both prorations, the period kept."""
    client, customer, subscription, price = _subscribed(fake, 1000)
    dearer = client.v1.prices.create({"product": price.product, "currency": "usd", "unit_amount": 3000,
                                      "recurring": {"interval": "month"}})
    before = _licensed_item(client, subscription)
    client.v1.subscriptions.update(subscription, {"items": [{"id": before.id, "price": dearer.id}],
                                                  "proration_behavior": "always_invoice"})
    after = _licensed_item(client, subscription)
    assert (after.current_period_start, after.current_period_end) == (before.current_period_start,
                                                                      before.current_period_end)
    invoice = client.v1.invoices.retrieve(client.v1.subscriptions.retrieve(subscription).latest_invoice)
    assert invoice.billing_reason == "subscription_update" and len(invoice.lines.data) == 2
    for line in invoice.lines.data:
        details = line.parent.subscription_item_details
        assert line.parent.type == "subscription_item_details" and details.proration is True
        assert details.subscription == subscription and details.invoice_item.startswith("ii_")
        assert "proration" not in line  # moved under parent in 2025-03-31.basil


def test_an_invoice_carries_its_first_lines_and_lists_them_all(fake):
    """Stripe's invoice carries "the first handful" of its lines (has_more beyond them); every line
    is read from /v1/invoices/{id}/lines, a page at a time."""
    client, customer, subscription, price = _subscribed(fake, 1000)
    other = client.v1.prices.create({"product": price.product, "currency": "usd", "unit_amount": 2000,
                                     "recurring": {"interval": "month"}})
    prices = [other, price] * 3
    for new in prices:  # six changes, pending prorations (two lines each), then one invoiced at once
        item = _licensed_item(client, subscription)
        client.v1.subscriptions.update(subscription, {"items": [{"id": item.id, "price": new.id}]})
    item = _licensed_item(client, subscription)
    client.v1.subscriptions.update(subscription, {"items": [{"id": item.id, "price": other.id}],
                                                  "proration_behavior": "always_invoice"})
    invoice = client.v1.invoices.retrieve(client.v1.subscriptions.retrieve(subscription).latest_invoice)
    assert len(invoice.lines.data) == 10 and invoice.lines.has_more
    first = client.v1.invoices.line_items.list(invoice.id, {"limit": 5})
    assert len(first.data) == 5 and first.has_more
    rest = client.v1.invoices.line_items.list(invoice.id, {"limit": 100, "starting_after": first.data[-1].id})
    every = first.data + rest.data
    assert len(every) == 14 and not rest.has_more and len({line.id for line in every}) == 14
    assert [line.id for line in every[:10]] == [line.id for line in invoice.lines.data]
    assert all(line.parent.subscription_item_details.proration for line in every)
    assert sum(line.amount for line in every) == invoice.total
