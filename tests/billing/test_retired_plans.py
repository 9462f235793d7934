"""A retired plan is no longer sold (review finding 12): Checkout refuses it, and `codeplan stripe
sync` archives its prices so Stripe offers them nowhere; subscriptions on it keep their price."""
from __future__ import annotations

import pytest

from ..conftest import new_plan, query, run
from .conftest import new_account, one, start_billing_bridge, stripe_sync
from .test_checkout import post

DEFAULT_PRICES = "lite=600,pro=3000/30000,max=6000/60000"


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


def test_a_retired_plan_cannot_be_bought_and_sync_archives_its_prices(database, fake, service):
    plan = new_plan(database, 1_000_000)
    prices = f"{DEFAULT_PRICES},{plan}=900/9000"
    first = stripe_sync(database, fake, CODEPLAN_PLAN_PRICES=prices)
    assert first.returncode == 0, first.stderr
    account, key = new_account(database)
    assert post(service, "/v1/billing/checkout", key, {"plan": plan}).status_code == 200

    run(query(database, "UPDATE plans SET retired_at = now() WHERE id = $1", plan))
    other, other_key = new_account(database)
    refused = post(service, "/v1/billing/checkout", other_key, {"plan": plan})
    assert refused.status_code == 400, refused.text
    assert f"plan {plan!r} is retired and no longer sold" in refused.json()["detail"]
    assert plan not in refused.json()["detail"].split("plans are:")[1]

    # still configured with a price: sync archives, it does not sell
    again = stripe_sync(database, fake, CODEPLAN_PLAN_PRICES=prices)
    assert again.returncode == 0, again.stderr
    client = fake.client()
    for interval in ("month", "year"):
        lookup = f"codeplan_{plan}_{interval}"
        assert f"price {lookup}" in again.stdout and "archived" in again.stdout
        listed = client.v1.prices.list({"lookup_keys": [lookup], "limit": 10}).data
        assert listed and all(p.active is False for p in listed)
        row = one(database, "SELECT current, plan_id FROM stripe_prices WHERE lookup_key = $1", lookup)
        assert (row["current"], row["plan_id"]) == (False, plan)  # not sold, still maps to the plan
    assert all(p.lookup_key not in (f"codeplan_{plan}_month", f"codeplan_{plan}_year")
               for p in client.v1.prices.list({"limit": 100, "active": True}).data)
    # the other plans are untouched, and a third sync changes nothing
    assert client.v1.prices.list({"lookup_keys": ["codeplan_pro_month"]}).data[0].active is True
    third = stripe_sync(database, fake, CODEPLAN_PLAN_PRICES=prices)
    assert third.returncode == 0 and third.stdout.strip().endswith("0 change(s) on Stripe"), third.stdout
    # what the account opened before the plan was retired is Stripe's to expire; a new one is refused
    assert post(service, "/v1/billing/checkout", key, {"plan": plan}).status_code == 400
