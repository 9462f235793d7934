"""/stripe/webhook: signatures on the raw body (bad, stale, rotated secrets), redeliveries, unknown
types, a secret without a key, and 1,000+ events delivered shuffled with duplicates reaching the same
state as in-order delivery, each effect once."""
from __future__ import annotations

import json
import random
import time

import httpx
import pytest

from ..conftest import _fresh_database, query, run, with_database
from ..stripe_fake import signature_header
from .conftest import (OLD_WEBHOOK_SECRET, WEBHOOK_SECRET, events_settled, new_account, one, start_billing_bridge,
                       start_fake, stripe_sync, wait_for)
from .test_checkout import post, session_id

DAY = 86400


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    assert stripe_sync(database, fake).returncode == 0
    # mid-rotation: the new secret and the old one are both accepted
    server = start_billing_bridge(database, simulator, fake, endpoint=False,
                                  STRIPE_WEBHOOK_SECRET=f"{WEBHOOK_SECRET},{OLD_WEBHOOK_SECRET}")
    yield server
    server.stop()


def send(service, payload: str, header: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if header is not None:
        headers["stripe-signature"] = header
    return httpx.post(service.url + "/stripe/webhook", content=payload.encode(), headers=headers, timeout=30)


def a_real_event(fake) -> dict:
    fake.client().v1.customers.create({"email": "someone@example.com"})
    return fake.events("customer.created")[-1]


def stored(database) -> int:
    return one(database, "SELECT count(*) FROM stripe_events")[0]


def test_bad_stale_and_missing_signatures_get_400_and_change_nothing(database, fake, service):
    payload = json.dumps(a_real_event(fake))
    before = stored(database)
    cases = {
        "missing": None,
        "garbage": "nonsense",
        "wrong secret": signature_header(payload, ["whsec_someone_else"]),
        "stale": signature_header(payload, [WEBHOOK_SECRET], int(time.time()) - 301),
        "future-proof replay of a tampered body": signature_header(payload.replace("someone", "attacker"),
                                                                   [WEBHOOK_SECRET]),
    }
    for name, header in cases.items():
        response = send(service, payload, header)
        assert response.status_code == 400, name
        assert response.headers["content-type"].startswith("application/problem+json"), name
    assert "older than 300 seconds" in send(service, payload, cases["stale"]).json()["detail"]
    assert stored(database) == before
    # the same body, properly signed, is accepted
    assert send(service, payload, signature_header(payload, [WEBHOOK_SECRET])).status_code == 200
    assert stored(database) == before + 1


def test_either_secret_verifies_during_rotation(database, fake, service):
    for secrets in ([OLD_WEBHOOK_SECRET], [WEBHOOK_SECRET], [WEBHOOK_SECRET, OLD_WEBHOOK_SECRET]):
        payload = json.dumps(a_real_event(fake))
        response = send(service, payload, signature_header(payload, secrets))
        assert response.status_code == 200 and response.json() == {"received": True, "duplicate": False}


def test_redelivery_is_acknowledged_and_recorded_once(database, fake, service):
    event = a_real_event(fake)
    payload = json.dumps(event)
    first = send(service, payload, signature_header(payload, [WEBHOOK_SECRET]))
    again = send(service, payload, signature_header(payload, [WEBHOOK_SECRET]))
    assert first.json()["duplicate"] is False and again.json()["duplicate"] is True
    assert one(database, "SELECT count(*) FROM stripe_events WHERE id = $1", event["id"])[0] == 1


def test_unknown_types_are_acknowledged_and_ignored(database, fake, service):
    event = dict(a_real_event(fake), id="evt_unknown_type_0001", type="issuing_card.shipped")
    payload = json.dumps(event)
    assert send(service, payload, signature_header(payload, [WEBHOOK_SECRET])).status_code == 200
    wait_for(lambda: one(database, "SELECT state FROM stripe_events WHERE id = $1", event["id"])["state"] == "ignored",
             30, what="unknown event ignored")


def test_a_signed_event_naming_what_stripe_does_not_have_changes_nothing(database, fake, service):
    account, key = new_account(database)
    forged = {"id": "evt_forged_0001", "object": "event", "type": "customer.subscription.created",
              "created": int(time.time()), "livemode": False, "api_version": "2026-10-28.endive",
              "data": {"object": {"id": "sub_does_not_exist", "object": "subscription", "status": "active",
                                  "customer": "cus_nobody", "metadata": {"codeplan_account_id": str(account)}}}}
    payload = json.dumps(forged)
    assert send(service, payload, signature_header(payload, [WEBHOOK_SECRET])).status_code == 200
    wait_for(lambda: one(database, "SELECT state FROM stripe_events WHERE id = $1", forged["id"])["state"] == "ignored",
             30, what="event about a missing object ignored")
    assert one(database, "SELECT count(*) FROM subscriptions WHERE account_id = $1", account)[0] == 0


def test_not_a_stripe_event_is_400(database, service):
    payload = '{"hello": "world"}'
    assert send(service, payload, signature_header(payload, [WEBHOOK_SECRET])).status_code == 400
    payload = "\xff not json"
    assert send(service, payload, signature_header(payload, [WEBHOOK_SECRET])).status_code == 400


def test_a_webhook_secret_without_a_key_verifies_and_records(pg_url, simulator, fake):
    database = _fresh_database(pg_url)
    from ..conftest import start_bridge
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
                          CODEPLAN_LOG_LEVEL="info")
    try:
        payload = json.dumps(a_real_event(fake))
        assert send(server, payload, signature_header(payload, ["whsec_other"])).status_code == 400
        assert send(server, payload, signature_header(payload, [WEBHOOK_SECRET])).status_code == 200
        assert one(database, "SELECT state FROM stripe_events")["state"] == "pending"  # applied once a key is set
        account, key = new_account(database)
        off = httpx.post(server.url + "/v1/billing/checkout", json={"plan": "pro"},
                         headers={"authorization": f"Bearer {key}"})
        assert off.status_code == 503 and off.json()["title"] == "Billing is off"
        state = httpx.get(server.url + "/v1/billing", headers={"authorization": f"Bearer {key}"}).json()
        assert state["billing"] is False and state["subscription"] is None
    finally:
        server.stop()
    logged = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    off_lines = [line for line in logged if line["msg"].startswith("billing is off")]
    assert len(off_lines) == 1 and "verified and recorded" in off_lines[0]["msg"]
    assert not any("whsec_" in line or "sk_test" in line for line in server.output().splitlines())


def test_no_webhook_secret_is_503(pg_url, simulator):
    from ..conftest import start_bridge
    server = start_bridge(_fresh_database(pg_url), simulator.url + "/api/coding/paas/v4")
    try:
        response = httpx.post(server.url + "/stripe/webhook", content=b"{}", headers={"stripe-signature": "t=1,v1=x"})
        assert response.status_code == 503 and "STRIPE_WEBHOOK_SECRET" in response.json()["detail"]
    finally:
        server.stop()


# ---- 1,000+ events, shuffled, duplicated ---------------------------------------------------

SNAPSHOT = {
    "subscriptions": "SELECT account_id, plan_id, status, stripe_subscription_id, ended_at IS NULL AS open"
                     " FROM subscriptions ORDER BY stripe_subscription_id, id",
    "mirror": "SELECT stripe_subscription_id, account_id, stripe_customer_id, status, plan_id, stripe_price_id,"
              " current_period_end, cancel_at_period_end, cancel_at, ended_at, past_due_since IS NULL AS in_good_standing"
              " FROM stripe_subscriptions ORDER BY 1",
    "invoices": "SELECT stripe_invoice_id, account_id, stripe_subscription_id, status, billing_reason, amount_due,"
                " amount_paid, currency, attempt_count, payment_problem, period_start, period_end, paid_at, created_at"
                " FROM billing_invoices ORDER BY 1",
    "topups": "SELECT stripe_checkout_session_id, account_id, tokens, amount, amount_refunded, stripe_payment_intent_id"
              " FROM topups ORDER BY 1",
    "customers": "SELECT id, stripe_customer_id FROM accounts ORDER BY id",
}


def snapshot(database: str) -> dict[str, list[dict]]:
    return {name: [dict(r) for r in run(query(database, sql))] for name, sql in SNAPSHOT.items()}


def make_history(fake, service, database, accounts: int, also: tuple[str, ...] = ()) -> None:
    """A few months of a small business on Stripe: sign-ups (some with trials), renewals, failed
    payments that recover or end in cancellation, upgrades, scheduled downgrades, cancellations at
    period end, top-ups and refunds."""
    rng = random.Random(7)
    client = fake.client()
    price = {k: client.v1.prices.list({"lookup_keys": [f"codeplan_{k}_month"]}).data[0].id for k in ("lite", "pro", "max")}
    topup_price = client.v1.prices.list({"lookup_keys": ["codeplan_topup_20000000"]}).data[0].id
    subscribers = []
    for i in range(accounts):
        account, key = new_account(database)
        for other in also:  # the same account, by id, in databases that receive events live
            assert new_account(other)[0] == account
        plan = ("lite", "pro", "max")[i % 3]
        url = post(service, "/v1/billing/checkout", key, {"plan": plan}).json()["url"]
        fake.complete_checkout(session_id(url), trial_days=7 if i % 7 == 0 else None)
        customer = one(database, "SELECT stripe_customer_id FROM accounts WHERE id = $1", account)[0]
        subscribers.append((account, key, customer, plan))
    subs = {s.customer: s for s in client.v1.subscriptions.list({"limit": 100, "status": "all"}).data}
    for i, (account, key, customer, plan) in enumerate(subscribers):
        sub = subs[customer]
        kind = i % 6
        if kind == 1:  # upgrade now
            target = "max" if plan != "max" else "pro"
            client.v1.subscriptions.update(sub.id, {"items": [{"id": sub["items"].data[0].id, "price": price[target]}],
                                                    "proration_behavior": "always_invoice"})
        elif kind == 2:
            fake.payment_behavior(customer, "decline")
        elif kind == 3:
            client.v1.subscriptions.update(sub.id, {"cancel_at_period_end": True})
        elif kind == 4:
            fake.schedule_price(sub.id, price["lite"])
        elif kind == 5:
            # as Codeplan's top-up checkout makes it (that one wants the plan applied first)
            meta = {"codeplan_account_id": str(account), "codeplan_topup_tokens": "20000000"}
            topup = client.v1.checkout.sessions.create({
                "mode": "payment", "customer": customer, "client_reference_id": str(account),
                "line_items": [{"price": topup_price, "quantity": 1}], "metadata": meta,
                "payment_intent_data": {"metadata": meta}, "success_url": "https://codeplan.example/billing"})
            fake.complete_checkout(topup.id)
            if rng.random() < 0.6:
                intent = client.v1.checkout.sessions.retrieve(topup.id).payment_intent
                client.v1.refunds.create({"payment_intent": intent, "amount": rng.choice([300, 1000])})
    fake.advance(32 * DAY)
    for i, (account, key, customer, plan) in enumerate(subscribers):
        if i % 6 == 2 and i % 4 == 0:
            fake.payment_behavior(customer, "ok")  # some recover at the first retry
    fake.advance(32 * DAY)
    for i, (account, key, customer, plan) in enumerate(subscribers):
        if i % 6 == 0:
            fake.payment_behavior(customer, "decline")  # their last renewal fails: past_due at the end
    fake.advance(32 * DAY)


def test_a_thousand_events_shuffled_with_duplicates_reach_the_in_order_state(pg_url, simulator):
    fake_server, fake = start_fake()
    servers = []

    def copy_of(database: str) -> str:
        name = "t_copy_" + str(random.randrange(10**9))
        run(query(pg_url, f"CREATE DATABASE {name} TEMPLATE {database.split('?')[0].rsplit('/', 1)[1]}"))
        return with_database(pg_url, name)
    try:
        origin = _fresh_database(pg_url)
        assert stripe_sync(origin, fake).returncode == 0
        # a third database receives the events live, while the history happens: at least once,
        # some twice, each after a random delay (so out of order)
        live = copy_of(origin)
        c = start_billing_bridge(live, simulator, fake, endpoint=False)
        servers.append(c)
        fake.add_endpoint(c.url + "/stripe/webhook", [WEBHOOK_SECRET], duplicate_rate=0.25, delay_max=0.5)
        maker = start_billing_bridge(origin, simulator, fake, endpoint=False)
        servers.append(maker)
        make_history(fake, maker, origin, accounts=36, also=(live,))
        maker.stop()
        events = [e["id"] for e in fake.events()]
        assert len(events) >= 1000, len(events)
        assert run(query(origin, "SELECT count(*) AS n FROM stripe_events"))[0]["n"] == 0  # nothing delivered yet

        # two copies of the database as it stood, one per delivery order
        in_order, shuffled = copy_of(origin), copy_of(origin)
        a = start_billing_bridge(in_order, simulator, fake, endpoint=False)
        servers.append(a)
        b = start_billing_bridge(shuffled, simulator, fake, endpoint=False)
        servers.append(b)

        result = fake.deliver(events, a.url + "/stripe/webhook", [WEBHOOK_SECRET], concurrency=1)
        assert result["ok"] == len(events)
        rng = random.Random(12)
        chaos = events + rng.sample(events, len(events) // 3) + rng.sample(events, 50)
        rng.shuffle(chaos)
        result = fake.deliver(chaos, b.url + "/stripe/webhook", [WEBHOOK_SECRET], concurrency=8)
        assert result["ok"] == len(chaos)
        for database in (in_order, shuffled):
            events_settled(database, fake, timeout=300)
            assert run(query(database, "SELECT count(*) AS n FROM stripe_events"))[0]["n"] == len(events)

        first, second = snapshot(in_order), snapshot(shuffled)
        for table in SNAPSHOT:
            assert first[table] == second[table], table

        # live delivery saw the states in between: it made Codeplan subscriptions for plans that
        # have since ended (canceled now), which the after-the-fact deliveries never granted;
        # everything else is the same
        events_settled(live, fake, timeout=300)
        third = snapshot(live)
        for table in ("mirror", "invoices", "topups", "customers"):
            assert third[table] == first[table], table
        assert [s for s in third["subscriptions"] if s["status"] != "canceled"] == \
            [s for s in first["subscriptions"] if s["status"] != "canceled"]
        assert len(third["subscriptions"]) > len(first["subscriptions"])
        assert any(d["event"] for d in fake.deliveries() if d["url"].startswith(c.url))

        # and both are Stripe's truth, each effect once
        truth = fake.objects()
        ours = {s["id"]: s for s in truth["subscriptions"]}
        mirror = {m["stripe_subscription_id"]: m for m in first["mirror"]}
        assert set(mirror) == set(ours)
        assert all(mirror[i]["status"] == ours[i]["status"] for i in ours)
        statuses = {s["status"] for s in ours.values()}
        assert {"active", "past_due", "canceled"} <= statuses, statuses
        local = {s["stripe_subscription_id"]: s for s in first["subscriptions"]}
        for ident, sub in ours.items():
            if sub["status"] == "canceled" and ident not in local:
                continue  # learned of only once it had ended (all events were sent afterwards): never granted
            expected = {"active": "active", "trialing": "active", "past_due": "active", "canceled": "canceled",
                        "unpaid": "past_due"}[sub["status"]]
            assert local[ident]["status"] == expected, (ident, sub["status"])
        assert sum(s["status"] == "active" for s in first["subscriptions"]) >= len(ours) // 2
        assert len(first["invoices"]) == len(truth["invoices"])
        paid_topups = [s for s in truth["sessions"] if s["mode"] == "payment" and s["status"] == "complete"]
        assert len(first["topups"]) == len(paid_topups) > 0
        refunded = {c["payment_intent"]: c["amount_refunded"] for c in truth["charges"]}
        assert all(t["amount_refunded"] == refunded[t["stripe_payment_intent_id"]] for t in first["topups"])
        assert any(t["amount_refunded"] for t in first["topups"])
    finally:
        for server in servers:
            server.stop()
        fake_server.stop()


def test_events_the_endpoint_never_received_are_read_from_stripes_list(database, simulator, fake, service):
    """Stripe gave up on the endpoint (or it was never subscribed): a purchase still reaches the
    ledger, from Stripe's list of events, each event once however often it is read."""
    server = start_billing_bridge(database, simulator, fake, endpoint=False, CODEPLAN_STRIPE_CATCHUP_SECONDS="0.5")
    try:
        account, key = new_account(database)
        response = post(server, "/v1/billing/checkout", key, {"plan": "pro"})
        assert response.status_code == 200, response.text
        fake.complete_checkout(session_id(response.json()["url"]))
        wanted = [e["id"] for e in fake.events("checkout.session.completed")][-1:]
        assert not fake.deliveries() or all(not d["url"].startswith(server.url) for d in fake.deliveries())
        wait_for(lambda: one(database, "SELECT s.plan_id FROM subscriptions s WHERE s.account_id = $1"
                                       " AND s.status = 'active'", account), 60, what="the purchase applied")
        wait_for(lambda: one(database, "SELECT state FROM stripe_events WHERE id = $1", wanted[0])["state"]
                 == "applied", 30, what="the checkout's event applied")
        time.sleep(1.5)  # more passes read the same events again: recorded once
        assert one(database, "SELECT count(*) FROM stripe_events WHERE id = $1", wanted[0])[0] == 1
        assert one(database, "SELECT through IS NOT NULL FROM stripe_catchup")[0]
    finally:
        server.stop()
    # the reading process gave its claim up (a pass ended, or was cut short by the stop)
    assert one(database, "SELECT claimed_until IS NULL FROM stripe_catchup")[0]
