"""The usage ledger: a two-phase state machine over `usage_ledger` and `quota_windows`.

    pending --post--> posted      the upstream's usage (or, failing that, what we delivered)
            --void--> voided      nothing was served
            --sweep-> expired     the process that held it died; settled at what it can prove

Every transition is one call of a guarded SQL function (rules: migrations/0005; the current
version, with credits, top-ups and overage: migrations/0031) in one transaction,
so a replay or a race between two settlers applies it at most once; each takes its locks in one
order (the subscription's flight row, the entry, the windows by id). Under load, transitions
that arrive while one call is in flight share the next call (migrations/0004).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import logging
import random
import uuid
from typing import Any, Awaitable, Callable

import asyncpg

from bridge.ports import Admission, Counts, Reservation, Settlement

log = logging.getLogger("codeplan.ledger")


# the bridge's words for what crosses the boundary; `Usage` is kept as the ledger's own name
Usage = Counts

# A deadlock or serialization failure, should one still happen, is retried here and never
# reaches a client (the lock order in migrations/0005 is meant to leave none).
_TRANSIENT = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_TRANSIENT_ATTEMPTS = 5


async def _retrying(call: Callable[[], Awaitable[Any]]) -> Any:
    for attempt in range(1, _TRANSIENT_ATTEMPTS + 1):
        try:
            return await call()
        except _TRANSIENT as exc:
            if attempt == _TRANSIENT_ATTEMPTS:
                raise
            log.warning("ledger transaction retried", extra={"error": type(exc).__name__, "attempt": attempt})
            await asyncio.sleep(random.uniform(0.001, 0.01) * attempt)
    raise AssertionError("unreachable")


def _usd(cost: float | None) -> decimal.Decimal | None:
    """A cost for a numeric column, to the nano-dollar."""
    return None if cost is None else decimal.Decimal(f"{cost:.9f}")


def _admission(row: asyncpg.Record) -> Admission:
    return Admission(outcome=row["outcome"], window_kind=row["window_kind"],
                     resets_at=row["resets_at"], allowance=row["allowance"], detail=row["detail"],
                     room=row["room"])


class _Batcher:
    """Group calls that arrive while one is in flight into the next single call.

    At low load every call goes alone (it waits for nothing); under load the calls queued during
    one round trip share the next, so the database sees one call and one commit for many. One
    failing batch is retried element by element, so a fault stays with the element that caused it.
    """

    def __init__(self, one: Callable[[Any], Awaitable[Any]], many: Callable[[list], Awaitable[list]],
                 orphan: Callable[[Any, Any], None] | None = None, max_size: int = 128) -> None:
        self._one = one
        self._many = many
        self._orphan = orphan  # called for a result nobody waits for any more
        self._max = max_size
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._busy = False

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if not self._busy:
            # nothing in flight: make the call here, no hand-off; those who arrive meanwhile
            # queue, and a task takes them on when this call returns
            self._busy = True
            try:
                return await self._one(item)
            finally:
                if self._queue:
                    loop.create_task(self._run())
                else:
                    self._busy = False
        future = loop.create_future()
        self._queue.append((item, future))
        return await future

    async def _run(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:self._max]
                del self._queue[:self._max]
                items = [item for item, _ in batch]
                results: list[Any]
                try:
                    results = [await self._one(items[0])] if len(items) == 1 else await self._many(items)
                except Exception as exc:  # noqa: BLE001 - handed to the callers below
                    results = [exc] if len(items) == 1 else [await self._alone(item) for item in items]
                for (item, future), result in zip(batch, results):
                    if future.done():  # the caller was cancelled meanwhile
                        if self._orphan is not None and not isinstance(result, BaseException):
                            self._orphan(item, result)
                    elif isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._busy = False

    async def _alone(self, item: Any) -> Any:
        try:
            return await self._one(item)
        except Exception as exc:  # noqa: BLE001
            return exc


class Ledger:
    """The bridge's `LedgerPort`, over the SQL functions of migrations/0031."""

    def __init__(self, pool: asyncpg.Pool, *, lease_seconds: float) -> None:
        self._pool = pool
        self._lease = lease_seconds
        self._admissions = _Batcher(self._admit_one, self._admit_many, orphan=self._void_orphan)
        self._settlements = _Batcher(self._settle_one, self._settle_many)

    async def admit(self, reservation: Reservation) -> Admission:
        return await self._admissions(reservation)

    async def _admit_one(self, a: Reservation) -> Admission:
        return (await self._admit_many([a]))[0]

    async def _admit_many(self, batch: list[Reservation]) -> list[Admission]:
        rows = await _retrying(lambda: self._pool.fetch(
            "SELECT * FROM ledger_admit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            [a.entry_id for a in batch], [a.subscription_id for a in batch],
            [a.api_key_id for a in batch], [a.surface for a in batch], [a.model for a in batch],
            [a.prompt_estimate for a in batch], [a.reserve for a in batch],
            [a.held for a in batch], self._lease))
        by_index = {r["i"]: _admission(r) for r in rows}
        return [by_index[i + 1] for i in range(len(batch))]

    def _void_orphan(self, a: Reservation, admission: Admission) -> None:
        """An admission whose caller went away before hearing of it: nothing was forwarded."""
        if admission.admitted:
            asyncio.get_running_loop().create_task(self.void(a.entry_id, reason="admission abandoned"))

    async def settle(self, settlement: Settlement) -> int | None:
        """Settle a pending entry. Returns the billed credits, or None if it was settled already
        (a replay). Raises on a database failure: the caller retries, harmlessly."""
        return await self._settlements(settlement)

    async def post(self, entry_id: uuid.UUID, usage: Counts, *, estimated: bool, reason: str,
                   upstream_request_id: str | None = None) -> int | None:
        return await self.settle(Settlement(entry_id, "posted", usage, estimated, reason, upstream_request_id))

    async def void(self, entry_id: uuid.UUID, *, reason: str) -> int | None:
        return await self.settle(Settlement(entry_id, "voided", Counts(), False, reason))

    async def _settle_one(self, s: Settlement) -> int | None:
        return (await self._settle_many([s]))[0]

    async def _settle_many(self, batch: list[Settlement]) -> list[int | None]:
        rows = await _retrying(lambda: self._pool.fetch(
            "SELECT * FROM ledger_settle_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            [s.entry_id for s in batch], [s.state for s in batch],
            [s.counts.prompt_tokens for s in batch], [s.counts.completion_tokens for s in batch],
            [s.counts.cached_tokens for s in batch], [s.counts.reasoning_tokens for s in batch],
            [s.estimated for s in batch], [s.reason for s in batch],
            [s.upstream_request_id for s in batch], [s.upstream for s in batch],
            [_usd(s.upstream_cost) for s in batch]))
        billed = {r["i"]: r["billed"] for r in rows}
        return [billed.get(i + 1) for i in range(len(batch))]

    async def heartbeat(self, entry_id: uuid.UUID, delivered_tokens: int) -> bool:
        """Extend a live request's lease and record the completion tokens it has delivered.
        False when the entry is no longer pending."""
        status = await self._pool.execute(
            "UPDATE usage_ledger SET delivered_tokens = $2,"
            " lease_until = now() + make_interval(secs => $3)"
            " WHERE id = $1 AND state = 'pending'",
            entry_id, delivered_tokens, self._lease)
        return status == "UPDATE 1"

    async def expire_due(self, limit: int = 500) -> int:
        rows = await _retrying(lambda: self._pool.fetch("SELECT * FROM ledger_expire_due($1)", limit))
        if rows:
            log.warning("expired pending reservations", extra={"count": len(rows)})
        return len(rows)

    async def rollup(self, before: dt.datetime) -> int:
        """Move settled rows created before `before` into per-day aggregates; totals unchanged."""
        return await self._pool.fetchval("SELECT ledger_rollup($1)", before)
