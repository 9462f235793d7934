"""A meter event set aside ('failed') is the operator's: `codeplan stripe outbox retry [--id N]`
sends it again with the identifier it was made with, where that cannot count its usage twice, and
says for every other row why it stays (older than the 35 days Stripe accepts an event for; possibly
recorded by an attempt whose answer was lost, past Stripe's 24 hours of identifier memory). Before,
a row refused once (a host clock ahead of Stripe's, a meter briefly deactivated) was never sent:
its overage never billed."""
from __future__ import annotations

import subprocess
import time

import pytest

from ..conftest import CODEPLAN, ROOT, base_env, query, run
from .conftest import one, start_billing_bridge, stripe_sync, wait_for
from .test_outbox import add, at_stripe, customer, idle_outbox, minutes_ago, rows


@pytest.fixture(scope="module")
def service(database, simulator, fake):
    assert stripe_sync(database, fake).returncode == 0
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


def retry(database: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CODEPLAN + ["stripe", "outbox", "retry", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=base_env(CODEPLAN_DATABASE_URL=database))


def refuse_meter_events(fake) -> None:
    """Stripe refuses every meter event outright (a 4xx it says not to retry), as for a timestamp
    ahead of its clock."""
    fake.fault("/v1/billing/meter_events", 400, count=1000, type="invalid_request_error",
               message="Timestamp must be within the past 35 calendar days or up to 5 minutes in the future.",
               code="parameter_invalid_integer")


def test_a_row_refused_once_is_sent_again_by_the_operator_once_the_cause_is_fixed(database, fake, service):
    cus = customer(fake)
    idle_outbox(database, fake)
    refuse_meter_events(fake)
    try:
        add(database, cus, 2_000_000, minutes_ago(3))
        wait_for(lambda: rows(database, cus)[0]["state"] == "failed", 60, what="refused row set aside")
    finally:
        fake.clear_faults()
    [row] = rows(database, cus)
    assert (row["failure"], row["attempts"]) == ("refused", 1) and "parameter_invalid_integer" in row["last_error"]
    time.sleep(3)  # the worker passes every second: it never re-drives a set-aside row by itself
    assert rows(database, cus)[0]["state"] == "failed" and at_stripe(fake, cus) == []

    done = retry(database, "--id", str(row["id"]))
    assert done.returncode == 0, done.stderr
    assert f"row {row['id']}: {cus}" in done.stdout
    assert f"back to sending, identifier {row['identifier']}" in done.stdout
    assert "1 row(s) back to sending, 0 left failed" in done.stdout
    wait_for(lambda: rows(database, cus)[0]["state"] == "sent", 60, what="re-driven row sent")
    events = at_stripe(fake, cus)
    assert [(e["identifier"], int(e["payload"]["value"])) for e in events] == [(row["identifier"], 2_000_000)]
    audit = one(database, "SELECT actor, before, after FROM admin_audit WHERE action = 'outbox.retry' AND target = $1",
                f"meter_outbox:{row['id']}")
    assert audit["actor"] == "cli" and '"refused"' in audit["before"] and '"sending"' in audit["after"]
    # nothing left to re-drive under that id: said, and a failing status
    again = retry(database, "--id", str(row["id"]))
    assert again.returncode == 1 and f"no failed meter_outbox row with id {row['id']}" in again.stderr


def test_a_refused_row_an_earlier_attempt_may_have_recorded_is_counted_once(database, fake, service):
    """The first attempt reached Stripe and its answer was lost (three 500s after the fact: the
    library's retries of it too); the second was refused outright. Within Stripe's identifier
    memory the row is sent again and answered "already exists": counted once. Past it, it could
    be counted twice: left, with what to check."""
    cus = customer(fake)
    idle_outbox(database, fake)
    fake.fault("/v1/billing/meter_events", 500, count=3, when="after")
    refuse_meter_events(fake)
    try:
        add(database, cus, 4321, minutes_ago(3))
        wait_for(lambda: rows(database, cus)[0]["state"] == "failed", 60, what="refused row set aside")
    finally:
        fake.clear_faults()
    [row] = rows(database, cus)
    assert (row["failure"], row["attempts"]) == ("refused", 2) and len(at_stripe(fake, cus)) == 1

    run(query(database, "UPDATE meter_outbox SET frozen_at = now() - interval '2 days' WHERE id = $1", row["id"]))
    left = retry(database, "--id", str(row["id"]))
    assert left.returncode == 1 and "left failed: an earlier attempt may have been recorded" in left.stdout
    assert "0 row(s) back to sending, 1 left failed" in left.stdout
    assert rows(database, cus)[0]["state"] == "failed"

    run(query(database, "UPDATE meter_outbox SET frozen_at = now() - interval '1 hour' WHERE id = $1", row["id"]))
    assert retry(database, "--id", str(row["id"])).returncode == 0
    wait_for(lambda: rows(database, cus)[0]["state"] == "sent", 60, what="re-driven row confirmed")
    assert [int(e["payload"]["value"]) for e in at_stripe(fake, cus)] == [4321]  # once
    assert rows(database, cus)[0]["frozen_at"] < one(database, "SELECT now() - interval '50 minutes'")[0]


def test_each_set_aside_row_is_re_driven_or_left_as_it_may_safely_be(fresh_database):
    """Without a worker running (the rows stay where the command leaves them): all failed rows,
    each judged on its own, a line each and the totals."""
    database = fresh_database
    run(query(database, "INSERT INTO accounts (email) VALUES ('redrive@example.com')"))
    run(query(database, "INSERT INTO stripe_subscriptions (stripe_subscription_id, account_id, stripe_customer_id,"
                        " status, current_period_start)"
                        " SELECT 'sub_rd', id, 'cus_rd', 'active', now() - interval '1 day'"
                        " FROM accounts WHERE email = 'redrive@example.com'"))
    cases = {  # identifier: (minute, attempts, failure, frozen, period_start)
        "rd-too-old": ("36 days", 1, "refused", "36 days", None),
        "rd-never-recorded": ("40 hours", 1, "refused", "40 hours", "31 days"),
        "rd-maybe-recorded": ("30 hours", 2, "unconfirmed", "30 hours", None),
        "rd-remembered": ("2 hours", 3, "refused", "2 hours", None),
        "rd-never-tried": ("29 hours", 0, "unconfirmed", "29 hours", None),
    }
    ids = {}
    for identifier, (minute, attempts, failure, frozen, period) in cases.items():
        ids[identifier] = run(query(
            database, "INSERT INTO meter_outbox (stripe_customer_id, event_name, minute, last_at, seq, value,"
                      " identifier, state, attempts, failure, frozen_at, last_error, period_start)"
                      " VALUES ('cus_rd', 'codeplan_overage_tokens', date_trunc('minute', now() - $1::text::interval),"
                      " date_trunc('minute', now() - $1::text::interval), 0, 1000, $2, 'failed', $3, $4,"
                      " now() - $5::text::interval, 'refused', now() - $6::text::interval) RETURNING id",
            minute, identifier, attempts, failure, frozen, period))[0]["id"]
    done = retry(database)
    assert done.returncode == 1, done.stderr
    lines = {line.partition(":")[0]: line for line in done.stdout.splitlines()}
    assert "older than the 35 days" in lines[f"row {ids['rd-too-old']}"]
    assert "may have been recorded" in lines[f"row {ids['rd-maybe-recorded']}"]
    for resent in ("rd-never-recorded", "rd-remembered"):
        assert f"back to sending, identifier {resent}" in lines[f"row {ids[resent]}"]
    # no attempt counted proves nothing: a crash after Stripe recorded it rolled the count back
    assert "may have been recorded" in lines[f"row {ids['rd-never-tried']}"]
    assert "its billing period is over" in lines[f"row {ids['rd-never-recorded']}"]
    assert "its billing period is over" not in lines[f"row {ids['rd-remembered']}"]
    assert done.stdout.splitlines()[-1] == "2 row(s) back to sending, 3 left failed"
    state = {r["identifier"]: r for r in run(query(
        database, "SELECT identifier, state, failure, attempts, frozen_at > now() - interval '1 minute' AS window_anew,"
                  " next_attempt_at <= now() AS due FROM meter_outbox"))}
    assert {k: v["state"] for k, v in state.items()} == {
        "rd-too-old": "failed", "rd-maybe-recorded": "failed", "rd-never-tried": "failed",
        "rd-never-recorded": "sending", "rd-remembered": "sending"}
    # never recorded by Stripe: a new 23 hours to be confirmed in; possibly recorded within
    # Stripe's memory: the window it had; attempts kept (each attempt's idempotency key is new)
    assert state["rd-never-recorded"]["window_anew"]
    assert not state["rd-remembered"]["window_anew"] and state["rd-remembered"]["attempts"] == 3
    assert all(state[k]["failure"] is None and state[k]["due"]
               for k in ("rd-never-recorded", "rd-remembered"))
    assert state["rd-too-old"]["failure"] == "refused"
    # again: only the rows left, and nothing done
    again = retry(database)
    assert again.returncode == 1 and again.stdout.splitlines()[-1] == "0 row(s) back to sending, 3 left failed"


def test_an_id_that_is_no_row_is_refused_before_the_database(fresh_database):
    bad = retry(fresh_database, "--id", "-3")
    assert bad.returncode == 2 and "expected a row id" in bad.stderr
    missing = retry(fresh_database, "--id", "424242")
    assert missing.returncode == 1 and "no failed meter_outbox row with id 424242" in missing.stderr
