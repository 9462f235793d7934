"""The overage outbox: aggregated per customer per minute, a deterministic identifier per row, sent
by the background worker with backoff on 429 and errors, and never counted twice at Stripe, even
when Codeplan is killed between Stripe's answer and its own commit."""
from __future__ import annotations

import datetime as dt
import time

import pytest

from ..conftest import query, run
from .conftest import new_account, one, start_billing_bridge, stripe_sync, wait_for

EVENT = "codeplan_overage_tokens"


@pytest.fixture(scope="module")
def synced(database, fake):
    assert stripe_sync(database, fake).returncode == 0
    return one(database, "SELECT stripe_meter_id FROM stripe_meters WHERE event_name = $1", EVENT)[0]


@pytest.fixture(scope="module")
def service(database, simulator, fake, synced):
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


def customer(fake) -> str:
    return fake.client().v1.customers.create({"email": "overage@example.com"}).id


def add(database: str, customer_id: str, tokens: int, at: dt.datetime) -> int:
    return one(database, "SELECT billing_overage_add($1, $2, $3, $4)", customer_id, EVENT, at, tokens)[0]


def rows(database: str, customer_id: str):
    return run(query(database, "SELECT * FROM meter_outbox WHERE stripe_customer_id = $1 ORDER BY id", customer_id))


def at_stripe(fake, customer_id: str) -> list[dict]:
    return [e for e in fake.meter_events() if e["payload"]["stripe_customer_id"] == customer_id]


def sends_for(fake, customer_id: str) -> list[dict]:
    """The meter event requests Stripe received for `customer_id`, answered or not, in order."""
    return [r for r in fake.requests("/v1/billing/meter_events")
            if r["params"].get("payload", {}).get("stripe_customer_id") == customer_id]


def total_at_stripe(fake, meter: str, customer_id: str) -> int:
    summaries = fake.client().v1.billing.meters.event_summaries.list(
        meter, {"customer": customer_id, "start_time": 0, "end_time": int(time.time()) + 3600})
    return sum(s.aggregated_value for s in summaries.data)


def minutes_ago(n: float) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=n)


def test_usage_is_aggregated_per_customer_per_minute_with_fixed_identifiers(database, fake):
    a, b = customer(fake), customer(fake)
    minute = minutes_ago(30).replace(second=0, microsecond=0)
    first = add(database, a, 100, minute)
    assert add(database, a, 50, minute + dt.timedelta(seconds=40)) == first  # same minute, same row
    add(database, a, 7, minute + dt.timedelta(minutes=1))
    add(database, b, 9, minute)
    assert add(database, a, 0, minute) is None  # nothing to bill, no row
    epoch = int(minute.timestamp())
    assert [(r["value"], r["seq"], r["identifier"]) for r in rows(database, a)] == [
        (150, 0, f"cp-{a}-{epoch}-0"), (7, 0, f"cp-{a}-{epoch + 60}-0")]
    # once a minute's row is frozen for sending, later usage of that minute opens its next row
    run(query(database, "UPDATE meter_outbox SET state = 'sending' WHERE id = $1", first))
    late = add(database, a, 3, minute + dt.timedelta(seconds=59))
    assert late != first and rows(database, a)[-1]["identifier"] == f"cp-{a}-{epoch}-1"
    assert one(database, "SELECT value FROM meter_outbox WHERE id = $1", first)[0] == 150


def idle_outbox(database: str, fake) -> None:
    """Rows and faults of earlier tests are out of the way, so this test's faults meet its rows."""
    fake.clear_faults()
    wait_for(lambda: not one(database, "SELECT count(*) FROM meter_outbox WHERE state = 'sending'"
                                       " OR (state = 'open' AND minute < now() - interval '65 seconds')")[0],
             120, what="outbox idle")


def test_worker_sends_closed_minutes_through_rate_limits_and_errors(database, fake, service, synced):
    cus = customer(fake)
    idle_outbox(database, fake)
    fake.fault("/v1/billing/meter_events", 429, count=3, type="invalid_request_error", code="rate_limit",
               message="Request rate limit exceeded.")
    fake.fault("/v1/billing/meter_events", 503, count=4)  # more than the library's own two retries
    for minute, tokens in ((5, 1200), (4, 800), (4, 34), (3, 5)):
        add(database, cus, tokens, minutes_ago(minute))
    open_now = add(database, cus, 999, dt.datetime.now(dt.timezone.utc))  # this minute is not over yet
    wait_for(lambda: all(r["state"] == "sent" for r in rows(database, cus) if r["id"] != open_now), 120,
             what="closed minutes sent")
    sent = [r for r in rows(database, cus) if r["state"] == "sent"]
    assert sorted(r["value"] for r in sent) == [5, 834, 1200]
    assert sorted(e["identifier"] for e in at_stripe(fake, cus)) == sorted(r["identifier"] for r in sent)
    assert total_at_stripe(fake, synced, cus) == 2039
    assert any(r["attempts"] > 1 for r in sent)  # the failures were retried, with backoff
    refused = [r for r in fake.requests("/v1/billing/meter_events") if r["status"] in (429, 503)]
    assert len(refused) >= 7
    assert one(database, "SELECT state FROM meter_outbox WHERE id = $1", open_now)[0] == "open"
    for event in at_stripe(fake, cus):  # stamped with the latest usage of the row's minute
        row = next(r for r in sent if r["identifier"] == event["identifier"])
        assert event["timestamp"] == int(row["last_at"].timestamp()) and event["event_name"] == EVENT
        assert int(row["minute"].timestamp()) <= event["timestamp"] < int(row["minute"].timestamp()) + 60


def test_an_answer_lost_after_stripe_recorded_the_event_is_not_counted_twice(database, fake, service, synced):
    cus = customer(fake)
    idle_outbox(database, fake)
    # Stripe records the event, then the answer is lost (a 500 after the fact) three times over
    fake.fault("/v1/billing/meter_events", 500, count=3, when="after")
    add(database, cus, 4321, minutes_ago(3))
    wait_for(lambda: rows(database, cus)[0]["state"] == "sent", 120, what="sent after lost answers")
    assert len(at_stripe(fake, cus)) == 1 and total_at_stripe(fake, synced, cus) == 4321


def test_a_permanent_refusal_is_set_aside_and_logged(database, fake, service):
    cus = customer(fake)
    idle_outbox(database, fake)
    # Every send is refused while this test runs, not only the next one: a row an earlier test
    # left open for its current minute may fall due meanwhile and be sent first (it took a
    # one-time refusal in a CI run, and this test's row was then sent).
    fake.fault("/v1/billing/meter_events", 400, count=1000, type="invalid_request_error",
               message="No such customer: 'cus_x'", code="resource_missing")
    try:
        add(database, cus, 10, minutes_ago(3))
        wait_for(lambda: rows(database, cus)[0]["state"] == "failed", 60, what="refused row set aside")
    finally:
        fake.clear_faults()
    assert "resource_missing" in rows(database, cus)[0]["last_error"]
    assert at_stripe(fake, cus) == []


def test_killed_between_stripes_answer_and_the_commit_never_double_counts(database, fresh_database, simulator, fake,
                                                                          synced):
    # The module's bridge (`service`, on `database`) shares the fake and its faults: the row an
    # earlier test left open for its current minute is sent once that minute is over, and that send
    # must not take this test's one stalled answer (it did in a full run, leaving this row 'sent').
    wait_for(lambda: not one(database, "SELECT count(*) FROM meter_outbox WHERE state IN ('open', 'sending')")[0],
             150, what="the module's outbox sent")
    database = fresh_database  # alone: no other worker may pick the row up meanwhile
    assert stripe_sync(database, fake).returncode == 0
    server = start_billing_bridge(database, simulator, fake, endpoint=False)
    cus = customer(fake)
    # Stripe records the event and then stalls its answer: Codeplan dies waiting, before its commit
    fake.fault("/v1/billing/meter_events", 200, when="after", delay=120)
    try:
        add(database, cus, 777, minutes_ago(3))
        wait_for(lambda: at_stripe(fake, cus), 60, what="the event reached Stripe")
        assert rows(database, cus)[0]["state"] == "sending"
        server.kill()
    finally:
        server.stop()
    fake.clear_faults()
    assert rows(database, cus)[0]["state"] == "sending"  # the commit never happened
    restarted = start_billing_bridge(database, simulator, fake, endpoint=False)
    try:
        wait_for(lambda: rows(database, cus)[0]["state"] == "sent", 120, what="resent after restart")
    finally:
        restarted.stop()
    sends = sends_for(fake, cus)
    # the resend is answered as already done: a replay of the first answer (same idempotency key)
    # or, past Stripe's memory of the key, "an event already exists with identifier"
    assert len(sends) == 2 and (sends[1].get("replayed") or sends[1]["status"] == 400)
    assert len(at_stripe(fake, cus)) == 1 and total_at_stripe(fake, synced, cus) == 777


def test_a_failure_stripe_keeps_under_its_key_is_not_replayed_for_good(database, fake, service, synced):
    cus = customer(fake)
    idle_outbox(database, fake)
    # Stripe's endpoint fails once and remembers that 500 under the request's idempotency key for
    # 24 hours: a retry under the same key gets it again, however often it is tried
    fake.fault("/v1/billing/meter_events", 500, count=1, when="during")
    add(database, cus, 2468, minutes_ago(3))
    wait_for(lambda: rows(database, cus)[0]["state"] == "sent", 60, what="sent after a remembered failure")
    assert len(at_stripe(fake, cus)) == 1 and total_at_stripe(fake, synced, cus) == 2468
    sends = sends_for(fake, cus)
    assert sends[0]["status"] == 500 and sends[-1]["status"] == 200
    assert len({r["idempotency_key"] for r in sends}) == 2  # the worker's second attempt, a key of its own

