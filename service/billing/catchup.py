"""Events the webhook endpoint missed, read back from Stripe's list of events.

Stripe delivers an event to an endpoint until it is answered 2xx, for three days. After that, or
for an endpoint disabled, misconfigured or not subscribed to an event's type, it is never
delivered, and what it says (a subscription cancelled, a refund, a dispute) would never reach the
ledger: a plan served for free for good. So the worker reads `GET /v1/events` every
CODEPLAN_STRIPE_CATCHUP_SECONDS (Stripe lists the last 30 days) and records any event it does not
hold in the queue the webhook fills (`stripe_events`): the applier cannot tell the two apart, and a
later delivery of such an event is acknowledged as a redelivery.

The cursor (`stripe_catchup.through`) is the newest event's `created` seen; each pass reads from an
hour before it (an event is timestamped when it happens, and may be listed a little later). The
first pass reads three days back: what Stripe may still have been retrying. One process reads at a
time (the cursor row's lock; the others skip the pass).
"""
from __future__ import annotations

import logging
import time

import asyncpg

from .stripe_api import StripeAPI
from .webhooks import record

log = logging.getLogger("codeplan.billing.catchup")

OVERLAP_SECONDS = 3600
FIRST_LOOK_BACK_SECONDS = 3 * 86400


class Catchup:
    def __init__(self, pool: asyncpg.Pool, api: StripeAPI) -> None:
        self._pool = pool
        self._api = api

    async def run_once(self) -> int:
        """Record the events Stripe lists that were never received here; how many."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT extract(epoch FROM through)::bigint AS through FROM stripe_catchup"
                                      " WHERE id = 1 FOR UPDATE SKIP LOCKED")
            if row is None:
                return 0  # another process is reading
            since = (int(time.time()) - FIRST_LOOK_BACK_SECONDS if row["through"] is None
                     else row["through"] - OVERLAP_SECONDS)
            events = await self._api.events_since(since)
            missed = [event.id for event, raw in events if await record(conn, event, raw)]
            newest = max((event.created for event, _ in events), default=None)
            await conn.execute("UPDATE stripe_catchup SET through = greatest(through, to_timestamp($1)),"
                               " read_at = now() WHERE id = 1", newest)
        if missed:
            log.warning("stripe events the webhook never delivered, read from Stripe's list",
                        extra={"count": len(missed), "events": missed[:20]})
        return len(missed)
