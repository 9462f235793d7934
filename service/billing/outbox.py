"""The overage outbox worker: Billing Meter events, sent once each, never from a request path.

Overage tokens enter `meter_outbox` in the transaction that settles them (`billing_overage_add`),
aggregated per customer per minute. Here, a row whose minute is over is frozen ('sending': its
value can no longer grow; later tokens of that minute open a new row), then sent with the
`identifier` it was given when made. The send happens inside a transaction holding the row's lock,
and the row becomes 'sent' in that same transaction: a crash between Stripe's answer and the commit
leaves the row 'sending' and unlocked, so the next worker sends it again, and Stripe refuses the
repeated identifier, which we take as the proof it was recorded.

Each attempt has its own idempotency key (the identifier and the attempt's number): Stripe keeps the
first answer to a key for 24 hours, a 500 too, so one key for every attempt would have replayed a
failure of its own until the row was given up. The library's own retries of an attempt share its
key; a crashed attempt's number is rolled back with it, so its resend replays that attempt's answer.

Stripe remembers identifiers for at least 24 hours; a row that could not be confirmed within 23
hours of being frozen is set aside ('failed', logged) rather than risk a second count, whatever its
attempts met: a 429 or a 401 may follow a lost answer within one attempt (the library's retries),
and a crashed attempt's record rolls back with it, so no row can be proven never counted.
"""
from __future__ import annotations

import logging

import asyncpg

from . import stripe  # Stripe's library, loaded on first use (service/billing/__init__.py)
from .catalog import METER_EVENT_NAME
from .stripe_api import StripeAPI, describe, is_duplicate_meter_event, retry_delay, retryable

log = logging.getLogger("codeplan.billing.outbox")

# How long after a minute ends its row is frozen: settlements that began inside the minute have
# committed by then (a later one is not lost, it opens the minute's next row).
CLOSE_DELAY_SECONDS = 5


class Outbox:
    def __init__(self, pool: asyncpg.Pool, api: StripeAPI, retry_base: float) -> None:
        self._pool = pool
        self._api = api
        self._retry_base = retry_base

    async def freeze(self) -> int:
        """Closed minutes' open rows become 'sending'; a row an adder holds right now is skipped
        this time (its minute is frozen on the next pass)."""
        status = await self._pool.execute(
            "UPDATE meter_outbox SET state = 'sending', frozen_at = now() WHERE id IN ("
            " SELECT id FROM meter_outbox WHERE state = 'open'"
            "  AND minute < now() - make_interval(secs => $1) ORDER BY id FOR UPDATE SKIP LOCKED)",
            60 + CLOSE_DELAY_SECONDS)
        return int(status.split()[-1])

    async def send_one(self) -> bool:
        """Send the next due frozen row. False when none is due."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT id, stripe_customer_id, event_name, minute, last_at, value, identifier, attempts,"
                " frozen_at < now() - interval '23 hours' AS too_late,"
                " minute < now() - interval '35 days' + interval '1 minute' AS too_old"
                " FROM meter_outbox WHERE state = 'sending' AND next_attempt_at <= now()"
                " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
            if row is None:
                return False
            if row["too_late"]:
                await self._fail(conn, row, "not confirmed within Stripe's identifier window; check the "
                                 "meter's events on Stripe before sending again")
                return True
            if row["too_old"]:
                await self._fail(conn, row, "older than the 35 days Stripe accepts")
                return True
            await conn.execute("UPDATE meter_outbox SET attempts = attempts + 1 WHERE id = $1", row["id"])
            params = {"event_name": row["event_name"], "identifier": row["identifier"],
                      "timestamp": int(row["last_at"].timestamp()),
                      "payload": {"stripe_customer_id": row["stripe_customer_id"], "value": str(row["value"])}}
            try:
                await self._api.create_meter_event(params, f"{row['identifier']}-try{row['attempts'] + 1}")
                outcome = "sent"
            except stripe.StripeError as exc:
                if is_duplicate_meter_event(exc):
                    outcome = "sent"  # Stripe already holds this identifier: it was recorded
                elif retryable(exc) or isinstance(exc, (stripe.AuthenticationError, stripe.PermissionError)):
                    delay = retry_delay(self._retry_base, row["attempts"], 300.0)
                    await conn.execute(
                        "UPDATE meter_outbox SET last_error = $2, next_attempt_at = now() + make_interval(secs => $3)"
                        " WHERE id = $1", row["id"], describe(exc), delay)
                    log.warning("meter event not sent; retried later",
                                extra={"outbox": row["id"], "error": describe(exc), "retry_in": round(delay, 2)})
                    return True
                else:
                    await self._fail(conn, row, describe(exc))
                    return True
            await conn.execute("UPDATE meter_outbox SET state = 'sent', sent_at = now(), last_error = NULL"
                               " WHERE id = $1", row["id"])
        return True

    @staticmethod
    async def _fail(conn: asyncpg.Connection, row: asyncpg.Record, why: str) -> None:
        await conn.execute("UPDATE meter_outbox SET state = 'failed', last_error = $2 WHERE id = $1", row["id"], why)
        log.error("meter event set aside", extra={"outbox": row["id"], "identifier": row["identifier"],
                                                  "value": row["value"], "why": why})
