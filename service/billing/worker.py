"""The billing worker, one per process (started in the app's lifespan when billing is on):

- applies queued webhook events (apply.py), woken at once by the webhook route of this process and
  polling for those received by others;
- freezes closed minutes of the overage outbox and sends them (outbox.py);
- cancels and refunds a second subscription an account paid for (duplicates.py);
- ends the plan of past_due subscriptions whose grace period ran out.

Several processes may run it against one database: every claim is `FOR UPDATE SKIP LOCKED`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from .apply import EventApplier
from .duplicates import Duplicates
from .outbox import Outbox

log = logging.getLogger("codeplan.billing.worker")


class BillingWorker:
    def __init__(self, pool: asyncpg.Pool, applier: EventApplier, outbox: Outbox, duplicates: Duplicates, *,
                 poll: float = 1.0) -> None:
        self._pool = pool
        self._applier = applier
        self._outbox = outbox
        self._duplicates = duplicates
        self._poll = poll
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._events(), name="billing-events"),
                       asyncio.create_task(self._ticks(), name="billing-ticks")]

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
            except Exception as exc:  # noqa: BLE001
                log.warning("billing tick failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(self._poll)
