"""Lock order between two processes' billing work (a review proved a deadlock): the event
applier takes the subscription's advisory lock, then (ended) queues its ended_subscription_invoices
row again; EndedInvoices.run_once locked that row FOR UPDATE, then took the same advisory lock.
Both now take the advisory lock first."""
from __future__ import annotations

import asyncio
import types

import asyncpg
import pytest

from service.billing.apply import EventApplier
from service.billing.ended import EndedInvoices
from service.billing.engine import installation_id
from service.billing.stripe_api import StripeAPI

from .conftest import events_settled, fake, start_billing_bridge, stripe_sync, wait_for, one  # noqa: F401
from .test_lifecycle import Subscriber
from ..stripe_fake import API_KEY


@pytest.fixture(scope="module")
def service(database, simulator, fake):  # noqa: F811
    assert stripe_sync(database, fake).returncode == 0
    server = start_billing_bridge(database, simulator, fake)
    yield server
    server.stop()


def test_applier_and_ended_worker_do_not_deadlock(database, fake, service):  # noqa: F811
    user = Subscriber(database, fake, service, "lite")
    fake.client().v1.subscriptions.cancel(user.stripe_id)
    user.settle()
    wait_for(lambda: one(database, "SELECT state FROM ended_subscription_invoices WHERE stripe_subscription_id = $1",
                         user.stripe_id)["state"] == "done", 30, what="settled once")
    service.stop()  # from here two other "processes": an applier (an event naming it) and an ended worker

    async def race():
        pool = await asyncpg.create_pool(database, min_size=2, max_size=4)
        slow, quick = StripeAPI(API_KEY, fake.url), StripeAPI(API_KEY, fake.url)
        try:
            inst = await installation_id(pool)
            applier = EventApplier(pool, slow, types.SimpleNamespace(past_due_grace=3600.0), 0.2, inst)
            ended = EndedInvoices(pool, quick, inst, 0.2)
            await pool.execute("UPDATE ended_subscription_invoices SET state = 'pending', next_attempt_at = now()"
                               " WHERE stripe_subscription_id = $1", user.stripe_id)  # a later event named it
            holding = asyncio.Event()
            original = slow.subscription

            async def stripe_round_trip(ident):  # Stripe answering, the advisory lock held
                holding.set()
                await asyncio.sleep(1.0)
                return await original(ident)
            slow.subscription = stripe_round_trip

            async def apply_event():
                async with pool.acquire() as conn, conn.transaction():
                    await applier.subscription(conn, user.stripe_id)

            async def ended_tick():
                await holding.wait()
                return await ended.run_once()
            return await asyncio.gather(apply_event(), ended_tick(), return_exceptions=True)
        finally:
            await slow.close()
            await quick.close()
            await pool.close()

    results = asyncio.run(race())
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    assert not failures, failures
