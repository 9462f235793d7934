"""A change of a subscription whose payment fails serves no more than was paid for (proven by
hunts against the Stripe fake): a declined change of billing period (month -> year) is served only
through the grace, like a renewal; a declined upgrade to a plan with the same windows but more of
anything else (models, concurrency, price) keeps the plan paid for; and while only an upgrade is
unpaid the plan paid for stays, whatever the catalogue says of the plan ordered."""
from __future__ import annotations

import time

import httpx
import pytest

from service import db

from ..conftest import database_before, query, run, settled_query
from .conftest import one, start_billing_bridge, stripe_sync, wait_for
from .test_lifecycle import Subscriber

DAY = 86400
PRICES = "lite=600,mini=800,team=1800,pro=3000/30000,max=6000/60000"


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    # lite: one model, one request at a time. team: lite's windows, every model, no concurrency
    # limit, three times the price (no larger by its windows alone). mini: smaller than lite in
    # every respect but its price (800 on Stripe; lite is re-priced above it in a test)
    run(query(database, "UPDATE plans SET models = ARRAY['glm-4.5-air'], max_concurrent = 1 WHERE id = 'lite'"))
    run(query(database, "INSERT INTO plans (id, name, window_tokens, weekly_tokens, monthly_price_cents, models)"
                        " SELECT 'team', 'Team', window_tokens, weekly_tokens, 1800,"
                        " ARRAY['glm-4.6', 'glm-4.5', 'glm-4.5-air'] FROM plans WHERE id = 'lite'"))
    run(query(database, "INSERT INTO plans (id, name, window_tokens, weekly_tokens, monthly_price_cents, models,"
                        " max_concurrent) VALUES ('mini', 'Mini', 20000000, 100000000, 800, ARRAY['glm-4.5-air'], 1)"))
    assert stripe_sync(database, fake, CODEPLAN_PLAN_PRICES=PRICES).returncode == 0
    # Stripe set to leave a subscription past_due after its retries (one of its three settings):
    # nothing but Codeplan's grace then ends what is unpaid
    fake.settings(retry_delays=[3 * DAY, 5 * DAY, 7 * DAY], after_retries="past_due")
    server = start_billing_bridge(database, simulator, fake, CODEPLAN_PLAN_PRICES=PRICES)
    yield server
    server.stop()
    fake.settings(after_retries="canceled")


def price(fake, lookup_key: str):
    return fake.client().v1.prices.list({"lookup_keys": [lookup_key]}).data[0]


def change_plan(user: Subscriber, lookup_key: str, behaviour: str = "always_invoice") -> None:
    """What the Customer Portal does for a plan change (Portal set-up: prorations invoiced at once)."""
    plan_item = next(i for i in user.stripe()["items"].data if i.price.recurring.usage_type == "licensed")
    user.fake.client().v1.subscriptions.update(user.stripe_id, {
        "items": [{"id": plan_item.id, "price": price(user.fake, lookup_key).id}], "proration_behavior": behaviour})


def ask(user: Subscriber, model: str) -> int:
    response = httpx.post(user.service.url + "/v1/chat/completions", timeout=60,
                          json={"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]},
                          headers={"authorization": f"Bearer {user.key}"})
    return response.status_code


def grace_over(database: str, user: Subscriber) -> None:
    """Codeplan's grace (CODEPLAN_PAST_DUE_GRACE) ends now (moved forward rather than waited for)."""
    settled_query(database, "UPDATE stripe_subscriptions SET grace_until = now() - interval '1 second'"
                            " WHERE stripe_subscription_id = $1 RETURNING 1", user.stripe_id)


def invoice_row(database: str, user: Subscriber):
    return one(database, "SELECT * FROM billing_invoices WHERE stripe_subscription_id = $1 AND status = 'open'"
                         " ORDER BY created_at DESC LIMIT 1", user.stripe_id)


def test_a_declined_switch_to_yearly_is_served_only_through_the_grace(database, fake, service):
    """Month -> year, card declined: Stripe starts the year at once and bills it (subscription_update,
    the year less the month's unused time), the subscription past_due. That invoice is no upgrade's
    proration: the grace runs and ends as for a renewal, and paying it gives the year."""
    user = Subscriber(database, fake, service, "pro")
    assert user.chat() == 200
    fake.advance(10 * DAY)
    fake.payment_behavior(user.customer, "decline")
    items = user.stripe()["items"].data
    yearly = {"licensed": price(fake, "codeplan_pro_year").id, "metered": price(fake, "codeplan_overage_year").id}
    fake.client().v1.subscriptions.update(user.stripe_id, {
        "items": [{"id": i.id, "price": yearly[i.price.recurring.usage_type]} for i in items],
        "proration_behavior": "always_invoice"})
    user.settle()
    sub = user.stripe()
    assert sub.status == "past_due" and sub["items"].data[0].current_period_end - fake.now() > 360 * DAY
    invoice = invoice_row(database, user)
    assert invoice["billing_reason"] == "subscription_update" and invoice["amount_due"] > 20000
    assert invoice["prorations_only"] is False  # it bills the year itself, not a proration
    assert one(database, "SELECT billing_only_upgrade_unpaid($1)", user.stripe_id)[0] is False
    row = user.row()
    assert (row["status"], row["refusal"], row["grace_until"] is not None) == ("active", None, True)
    assert user.chat() == 200  # inside the grace, as after a failed renewal

    grace_over(database, user)
    wait_for(lambda: user.row()["status"] == "past_due", 30, what="suspension once the grace is over")
    assert user.row()["refusal"] == "past_due"
    wait_for(lambda: user.chat() == 402, 30, what="requests refused once suspended")  # auth cache: a few seconds
    # an event applied again does not bring it back
    fake.client().v1.subscriptions.update(user.stripe_id, {"metadata": {"touched": "1"}})
    user.settle()
    assert user.row()["status"] == "past_due"

    fake.payment_behavior(user.customer, "ok")
    fake.client().v1.invoices.pay(invoice["stripe_invoice_id"])
    user.settle()
    assert (user.row()["status"], user.stripe().status) == ("active", "active")
    wait_for(lambda: user.chat() == 200, 30, what="served again once the year is paid")


def test_a_declined_upgrade_whose_invoice_has_more_lines_than_it_carries_keeps_the_paid_plan(database, fake,
                                                                                              service):
    """An upgrade's invoice that also sweeps up earlier pending prorations has more lines than the
    invoice carries (has_more): they are read from its lines, and it is an upgrade's proration
    still: the plan paid for is served past the grace."""
    user = Subscriber(database, fake, service, "pro")
    for lookup_key in ("codeplan_max_month", "codeplan_pro_month") * 3:  # billed at the renewal
        change_plan(user, lookup_key, "create_prorations")
    user.settle()
    assert user.row()["plan_id"] == "pro"
    fake.payment_behavior(user.customer, "decline")
    change_plan(user, "codeplan_max_month")
    user.settle()
    stripe_invoice = fake.client().v1.invoices.retrieve(user.stripe().latest_invoice)
    assert stripe_invoice.lines.has_more and stripe_invoice.billing_reason == "subscription_update"
    assert fake.requests(f"/v1/invoices/{stripe_invoice.id}/lines")  # read in full
    assert invoice_row(database, user)["prorations_only"] is True
    grace_over(database, user)
    time.sleep(3)  # the worker's grace pass runs every second
    row = user.row()
    assert (row["plan_id"], row["status"], row["stripe_status"]) == ("pro", "active", "past_due"), dict(row)
    assert user.chat() == 200


def test_a_declined_upgrade_to_a_plan_with_the_same_windows_is_not_served(database, fake, service):
    """lite -> team (lite's windows, every model, no concurrency limit, 3x the price), card
    declined: past_due with only the upgrade unpaid. lite is what is paid for: kept, past the
    grace too; team only once its invoice is paid."""
    user = Subscriber(database, fake, service, "lite")
    assert ask(user, "glm-4.5-air") == 200 and ask(user, "glm-4.6") != 200
    fake.payment_behavior(user.customer, "decline")
    change_plan(user, "codeplan_team_month")
    user.settle()
    assert user.stripe().status == "past_due"
    invoice = invoice_row(database, user)
    assert invoice["billing_reason"] == "subscription_update" and invoice["prorations_only"] is True
    row = user.row()
    assert (row["plan_id"], row["status"]) == ("lite", "active"), dict(row)
    assert ask(user, "glm-4.6") != 200  # only team serves it
    grace_over(database, user)
    time.sleep(3)  # the worker's grace pass runs every second
    row = user.row()
    assert (row["plan_id"], row["status"], row["refusal"]) == ("lite", "active", None), dict(row)
    assert ask(user, "glm-4.5-air") == 200 and ask(user, "glm-4.6") != 200

    fake.payment_behavior(user.customer, "ok")
    fake.client().v1.invoices.pay(invoice["stripe_invoice_id"])
    user.settle()
    assert (user.row()["plan_id"], user.row()["status"]) == ("team", "active")
    wait_for(lambda: ask(user, "glm-4.6") == 200, 30, what="team's models once it is paid")


def test_a_declined_upgrade_then_a_declined_renewal_serve_the_plan_paid_for_through_the_grace(database, fake,
                                                                                              service):
    """lite -> team declined, then the renewal (at team's price) declined too: more than an upgrade
    is unpaid now, the grace runs as for any failed renewal, on lite (the last plan paid for), not
    on team, whose windows are no larger but which gives every model."""
    user = Subscriber(database, fake, service, "lite")
    fake.payment_behavior(user.customer, "decline")
    change_plan(user, "codeplan_team_month")
    user.settle()
    fake.advance(32 * DAY)
    user.settle()
    # the upgrade's invoice prorates a period now over, team never served in it: voided (0058)
    def invoices():
        return [(r["billing_reason"], r["status"]) for r in settled_query(
            database, "SELECT billing_reason, status FROM billing_invoices WHERE stripe_subscription_id = $1"
                      " AND billing_reason <> 'subscription_create' ORDER BY created_at", user.stripe_id)]
    wait_for(lambda: invoices() == [("subscription_update", "void"), ("subscription_cycle", "open")], 30,
             what="the upgrade's invoice voided, the renewal open")
    row = user.row()
    assert (row["plan_id"], row["status"], row["stripe_status"]) == ("lite", "active", "past_due"), dict(row)
    assert ask(user, "glm-4.5-air") == 200 and ask(user, "glm-4.6") != 200


def test_while_only_an_upgrade_is_unpaid_the_plan_paid_for_stays_whatever_the_catalogue_says(database, fake,
                                                                                             service):
    """lite was bought at 600 and the catalogue since re-priced it at 1000; mini (smaller in every
    respect, 800) is no larger by the catalogue, but Stripe bills the change to it as dearer than
    the price paid. Declined: lite, paid for, stays until mini is paid."""
    user = Subscriber(database, fake, service, "lite")
    assert ask(user, "glm-4.5-air") == 200  # its windows open
    run(query(database, "UPDATE plans SET monthly_price_cents = 1000 WHERE id = 'lite'"))
    try:
        assert one(database, "SELECT billing_plan_no_larger('mini', 'lite')")[0] is True
        fake.payment_behavior(user.customer, "decline")
        change_plan(user, "codeplan_mini_month")
        user.settle()
        invoice = invoice_row(database, user)
        assert invoice["amount_due"] > 0 and invoice["prorations_only"] is True
        row = user.row()
        assert (row["plan_id"], row["status"], row["stripe_status"]) == ("lite", "active", "past_due"), dict(row)
        assert user.windows() == {"5h": 40_000_000, "week": 200_000_000}
        fake.payment_behavior(user.customer, "ok")
        fake.client().v1.invoices.pay(invoice["stripe_invoice_id"])
        user.settle()
        assert (user.row()["plan_id"], user.row()["status"]) == ("mini", "active")
        assert user.windows() == {"5h": 20_000_000, "week": 100_000_000}
    finally:
        run(query(database, "UPDATE plans SET monthly_price_cents = 600 WHERE id = 'lite'"))


def test_no_larger_means_in_every_respect_a_plan_gives(database):
    """billing_plan_no_larger: each thing a plan gives, larger on its own, makes it an upgrade."""
    run(query(database, "INSERT INTO plans (id, name, window_tokens, weekly_tokens, monthly_price_cents, models,"
                        " max_concurrent, overage_cap_tokens) VALUES"
                        " ('nl_base', 'Base', 100, 1000, 500, ARRAY['glm-4.6', 'glm-4.5'], 2, 5000),"
                        " ('nl_same', 'Same', 100, 1000, 500, ARRAY['glm-4.5', 'glm-4.6'], 2, 5000),"
                        " ('nl_less', 'Less', 50, 500, 300, ARRAY['glm-4.5'], 1, NULL),"
                        " ('nl_window', 'Window', 101, 1000, 500, ARRAY['glm-4.6', 'glm-4.5'], 2, 5000),"
                        " ('nl_weekly', 'Weekly', 100, 1001, 500, ARRAY['glm-4.6', 'glm-4.5'], 2, 5000),"
                        " ('nl_models', 'Models', 100, 1000, 500, ARRAY['glm-4.6', 'glm-4.5', 'glm-4.5-air'], 2, 5000),"
                        " ('nl_parallel', 'Parallel', 100, 1000, 500, ARRAY['glm-4.6', 'glm-4.5'], 3, 5000),"
                        " ('nl_unlimited', 'Unlimited', 100, 1000, 500, ARRAY['glm-4.6', 'glm-4.5'], NULL, 5000),"
                        " ('nl_overage', 'Overage', 100, 1000, 500, ARRAY['glm-4.6', 'glm-4.5'], 2, 6000),"
                        " ('nl_price', 'Price', 100, 1000, 501, ARRAY['glm-4.6', 'glm-4.5'], 2, 5000),"
                        " ('nl_cheap', 'Cheap', 100, 1000, 500, ARRAY['glm-4.6', 'glm-4.5'], 2, 5000),"
                        " ('nl_peak', 'Peak', 100, 1000, 500, ARRAY['glm-4.6', 'glm-4.5'], 2, 5000)"))
    run(query(database, "INSERT INTO plans (id, name, window_tokens, weekly_tokens, monthly_price_cents, models,"
                        " max_concurrent) VALUES ('nl_no_overage', 'No overage', 100, 1000, 500,"
                        " ARRAY['glm-4.6'], 2)"))
    # credits: cheaper output for one model; the peak surcharge waived for another
    run(query(database, "INSERT INTO plan_credits (plan_id, model, input_coeff, cached_coeff, output_coeff)"
                        " VALUES ('nl_cheap', 'glm-4.5', 1, 0.2, 0.5)"))
    run(query(database, "INSERT INTO plan_credits (plan_id, model, input_coeff, cached_coeff, output_coeff,"
                        " peak_multiplier) VALUES ('nl_peak', 'glm-4.6', 1, 0.2, 1, 1)"))
    run(query(database, "UPDATE model_credits SET peak_multiplier = 2 WHERE model = 'glm-4.6'"))
    try:
        def no_larger(new: str, old: str) -> bool:
            return one(database, "SELECT billing_plan_no_larger($1, $2)", new, old)[0]

        assert no_larger("nl_same", "nl_base") and no_larger("nl_less", "nl_base")
        assert no_larger("nl_no_overage", "nl_base")  # no overage at all is less than a cap
        for larger in ("nl_window", "nl_weekly", "nl_models", "nl_parallel", "nl_unlimited", "nl_overage",
                       "nl_price", "nl_cheap", "nl_peak"):
            assert not no_larger(larger, "nl_base"), larger
            assert no_larger("nl_base", larger), larger
        assert not no_larger("nl_base", "nl_no_overage") and not no_larger("nl_base", "nl_less")
        assert not no_larger("nl_base", "nl_gone") and not no_larger("nl_gone", "nl_base")
    finally:
        run(query(database, "UPDATE model_credits SET peak_multiplier = 1 WHERE model = 'glm-4.6'"))


async def test_migration_0053_judges_older_invoices_and_set_aside_rows(pg_url, tmp_path):
    """An upgrade: invoices recorded before 0053 (their lines never read) are judged by when they
    were made (one made as its subscription's period began started that period: not an upgrade's
    proration); rows set aside before it get their cause from their recorded error."""
    url = await database_before(pg_url, tmp_path, "0053")
    account = (await query(url, "INSERT INTO accounts (email) VALUES ('upgrade53@example.com') RETURNING id"))[0]["id"]
    cases = {"sub_upgrade": "10 days", "sub_new_period": "0 days"}  # invoice made this long after the period began
    for ident, after in cases.items():
        await query(url, "INSERT INTO stripe_subscriptions (stripe_subscription_id, account_id, stripe_customer_id,"
                         " status, current_period_start)"
                         " VALUES ($1, $2, 'cus_53', 'past_due', now() - interval '20 days')", ident, account)
        await query(url, "INSERT INTO billing_invoices (stripe_invoice_id, account_id, stripe_subscription_id, status,"
                         " billing_reason, amount_due, amount_paid, currency, created_at)"
                         " VALUES ('in_' || $1, $2, $1, 'open', 'subscription_update', 900, 0, 'usd',"
                         " now() - interval '20 days' + $3::text::interval)", ident, account, after)
    errors = {"refused": "InvalidRequestError 400 parameter_invalid_integer: Timestamp is too far in the future.",
              "unconfirmed": "not confirmed within Stripe's identifier window; check the meter's events on Stripe"
                             " before sending again",
              "too_old": "older than the 35 days Stripe accepts"}
    for n, error in enumerate(errors.values()):
        await query(url, "INSERT INTO meter_outbox (stripe_customer_id, event_name, minute, last_at, seq, value,"
                         " identifier, state, attempts, frozen_at, last_error)"
                         " VALUES ('cus_53', 'codeplan_overage_tokens', date_trunc('minute', now()), now(), $1, 10,"
                         " $2, 'failed', 1, now(), $3)", n, f"cp-53-{n}", error)
    await db.migrate(url)
    judged = await query(url, "SELECT billing_only_upgrade_unpaid('sub_upgrade') AS upgrade,"
                              " billing_only_upgrade_unpaid('sub_new_period') AS new_period")
    assert (judged[0]["upgrade"], judged[0]["new_period"]) == (True, False)
    rows = await query(url, "SELECT failure, last_error FROM meter_outbox ORDER BY id")
    assert [r["failure"] for r in rows] == list(errors)
