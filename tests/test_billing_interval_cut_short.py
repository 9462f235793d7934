"""An upgrade's proration invoice whose period a change of billing interval cut short is the
operator's to settle (service/billing/prorations.py): the switch's invoice credits the rest of
the period at the upgraded price, as though it had been paid, so voiding it whole gave that
credit away for days never paid (a reviewer's finding), and a refund in full would too."""
from __future__ import annotations

import pytest

from .billing.conftest import fake, one, start_billing_bridge, stripe_sync, wait_for  # noqa: F401
from .billing.test_lifecycle import Subscriber
from .billing.test_unpaid_changes import change_plan
from .conftest import settled_query
from .test_billing_declined_upgrades import DAY, declined_upgrade


@pytest.fixture(scope="module")
def service(database, simulator, fake):  # noqa: F811
    assert stripe_sync(database, fake).returncode == 0
    fake.settings(retry_delays=[3 * DAY, 5 * DAY, 7 * DAY], after_retries="past_due")
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


def test_an_upgrade_cut_short_by_an_interval_switch_is_left_to_the_operator(database, fake, service):  # noqa: F811
    """lite paid; 10 days in an upgrade to max monthly is declined (lite served); 10 days later,
    the card fixed, a switch to max yearly starts the year at once and credits max's unused 10
    days. The old upgrade's invoice is neither voided nor refunded: its row is failed, saying
    why, for the operator."""
    user = Subscriber(database, fake, service, "lite")
    fake.advance(10 * DAY)
    ident = declined_upgrade(user)["stripe_invoice_id"]
    fake.advance(10 * DAY)
    user.settle()
    fake.payment_behavior(user.customer, "ok")
    change_plan(user, "codeplan_max_year")
    user.settle()

    def row():
        return settled_query(database, "SELECT state, voided, refunded_amount, last_error"
                                       " FROM stale_proration_invoices WHERE stripe_invoice_id = $1", ident)

    wait_for(lambda: row() and row()[0]["state"] != "pending", 60, what="the worker's look at the old upgrade")
    found = row()[0]
    assert (found["state"], found["voided"], found["refunded_amount"]) == ("failed", False, 0), dict(found)
    assert "billing interval" in found["last_error"]
    assert fake.client().v1.invoices.retrieve(ident).status != "void"
