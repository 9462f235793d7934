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
first pass reads the 30 days Stripe lists. One process reads at a time: it claims the cursor's row
for CLAIM_SECONDS, renewed after every page (a claim rather than an advisory lock, which a pooler in
transaction mode would not keep), and the others skip the pass. Each event is recorded as it is
read, in no long transaction: a pass that fails half-way has kept what it recorded, gives up its
claim, and the next starts again from the cursor.
"""
from __future__ import annotations

import logging
import time

import asyncpg

from .stripe_api import StripeAPI
from .webhooks import record

log = logging.getLogger("codeplan.billing.catchup")

OVERLAP_SECONDS = 3600
FIRST_LOOK_BACK_SECONDS = 30 * 86400
CLAIM_SECONDS = 900
_CLAIM = "UPDATE stripe_catchup SET claimed_until = now() + make_interval(secs => $1)"


class Catchup:
    def __init__(self, pool: asyncpg.Pool, api: StripeAPI) -> None:
        self._pool = pool
        self._api = api

    async def run_once(self) -> int:
        """Record the events Stripe lists that were never received here; how many."""
        through = await self._pool.fetchrow(
            _CLAIM + " WHERE claimed_until IS NULL OR claimed_until < now()"
            " RETURNING extract(epoch FROM through)::bigint AS through", CLAIM_SECONDS)
        if through is None:
            return 0  # another process is reading
        missed: list[str] = []
        done = False
        try:
            since = (int(time.time()) - FIRST_LOOK_BACK_SECONDS if through["through"] is None
                     else through["through"] - OVERLAP_SECONDS)
            newest = None
            async for page in self._api.event_pages(since):
                for event, raw in page:
                    if await record(self._pool, event, raw):
                        missed.append(event.id)
                    newest = event.created if newest is None else max(newest, event.created)
                await self._pool.execute(_CLAIM, CLAIM_SECONDS)
            await self._pool.execute("UPDATE stripe_catchup SET through = greatest(through, to_timestamp($1)),"
                                     " read_at = now(), claimed_until = NULL", newest)
            done = True
        finally:
            if not done:
                try:
                    await self._pool.execute("UPDATE stripe_catchup SET claimed_until = NULL")
                except Exception as exc:  # noqa: BLE001 - the claim lapses by itself
                    log.warning("stripe events catch-up claim not given up; it lapses",
                                extra={"error": type(exc).__name__})
        if missed:
            log.warning("stripe events the webhook never delivered, read from Stripe's list",
                        extra={"count": len(missed), "events": missed[:20]})
        return len(missed)
