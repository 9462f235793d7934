"""The billing worker, one per process (started in the app's lifespan when billing is on):

- applies queued webhook events (apply.py), woken at once by the webhook route of this process and
  polling for those received by others;
- freezes closed minutes of the overage outbox and sends them (outbox.py);
- cancels and refunds a second subscription an account paid for (duplicates.py);
- voids an ended subscription's open invoices and refunds one paid after its end (ended.py);
- voids an upgrade's proration invoice whose period is over and refunds one paid after it
  (prorations.py);
- ends the plan of past_due subscriptions whose grace period ran out;
- reads Stripe's list of events for any the webhook endpoint missed (catchup.py).

Several processes may run it against one database: every claim is `FOR UPDATE SKIP LOCKED`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from .apply import EventApplier
from .catchup import Catchup
from .duplicates import Duplicates
from .ended import EndedInvoices
from .prorations import StaleProrations
from .outbox import Outbox

log = logging.getLogger("codeplan.billing.worker")


class BillingWorker:
    def __init__(self, pool: asyncpg.Pool, applier: EventApplier, outbox: Outbox, duplicates: Duplicates,
                 catchup: Catchup, ended: EndedInvoices | None = None,
                 stale: StaleProrations | None = None, *, poll: float = 1.0,
                 catchup_every: float = 600.0) -> None:
        self._pool = pool
        self._applier = applier
        self._outbox = outbox
        self._duplicates = duplicates
        self._catchup = catchup
        self._ended = ended
        self._stale = stale
        self._poll = poll
        self._catchup_every = catchup_every
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._events(), name="billing-events"),
                       asyncio.create_task(self._ticks(), name="billing-ticks"),
                       asyncio.create_task(self._catchups(), name="billing-catchup")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _events(self) -> None:
        while True:
            self._wake.clear()
            try:
                while await self._applier.run_once():
                    pass
            except Exception as exc:  # noqa: BLE001 - the loop outlives a lost connection
                log.warning("billing events pass failed", extra={"error": type(exc).__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)

    async def _ticks(self) -> None:
        while True:
            try:
                expired = await self._pool.fetchval("SELECT billing_expire_grace()")
                if expired:
                    log.warning("grace period over: past_due subscriptions lost their plan", extra={"count": expired})
                await self._outbox.freeze()
                while await self._outbox.send_one():
                    pass
                while await self._duplicates.run_once():
                    pass
                while self._ended is not None and await self._ended.run_once():
                    pass
                while self._stale is not None and await self._stale.run_once():
                    pass
            except Exception as exc:  # noqa: BLE001
                log.warning("billing tick failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(self._poll)

    async def _catchups(self) -> None:
        while True:
            # not at start-up: Stripe retries a delivery for three days, so what a restart
            # missed arrives by itself; this is for what Stripe gave up on
            await asyncio.sleep(self._catchup_every)
            try:
                if await self._catchup.run_once():
                    self.wake()
            except Exception as exc:  # noqa: BLE001 - Stripe or the database away: the next pass
                log.warning("stripe events catch-up failed", extra={"error": type(exc).__name__})
