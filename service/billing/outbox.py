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

A set-aside row is the operator's: `codeplan stripe outbox retry [--id N]` (`redrive`) sends it
again, with the same identifier, when that cannot count it twice (see `redrive`).
"""
from __future__ import annotations

import datetime as dt
import logging

import asyncpg
import msgspec

from . import stripe  # Stripe's library, loaded on first use (service/billing/__init__.py)
from .catalog import METER_EVENT_NAME
from .stripe_api import StripeAPI, describe, is_duplicate_meter_event, retry_delay, retryable

log = logging.getLogger("codeplan.billing.outbox")

# How long after a minute ends its row is frozen: settlements that began inside the minute have
# committed by then (a later one is not lost, it opens the minute's next row).
CLOSE_DELAY_SECONDS = 5

# Stripe takes a meter event whose timestamp is "within the past 35 calendar days or up to 5
# minutes in the future", and keeps an identifier unique "within a rolling period of at least 24
# hours" (Billing Meter Events API). A row is sent stamped with its latest usage, never before its
# minute: one whose minute is older than the 35 days (less a minute for the send) cannot be sent.
_TOO_OLD = "minute < now() - interval '35 days' + interval '1 minute'"
# frozen longer ago than this: an attempt's record may have outlived Stripe's memory of its
# identifier
_UNCONFIRMABLE = "frozen_at < now() - interval '23 hours'"


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
                f" {_UNCONFIRMABLE} AS too_late, {_TOO_OLD} AS too_old"
                " FROM meter_outbox WHERE state = 'sending' AND next_attempt_at <= now()"
                " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
            if row is None:
                return False
            if row["too_late"]:
                await self._fail(conn, row, "unconfirmed", "not confirmed within Stripe's identifier window; "
                                 "check the meter's events on Stripe before sending again")
                return True
            if row["too_old"]:
                await self._fail(conn, row, "too_old", "older than the 35 days Stripe accepts")
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
                    # a definite refusal (a 4xx Stripe says not to retry): nothing was recorded, so
                    # the operator may send it again once the cause is fixed (`redrive`)
                    await self._fail(conn, row, "refused", describe(exc))
                    return True
            await conn.execute("UPDATE meter_outbox SET state = 'sent', sent_at = now(), last_error = NULL"
                               " WHERE id = $1", row["id"])
        return True

    @staticmethod
    async def _fail(conn: asyncpg.Connection, row: asyncpg.Record, failure: str, why: str) -> None:
        await conn.execute("UPDATE meter_outbox SET state = 'failed', failure = $2, last_error = $3 WHERE id = $1",
                           row["id"], failure, why)
        log.error("meter event set aside; `codeplan stripe outbox retry` sends it again once the cause is fixed",
                  extra={"outbox": row["id"], "identifier": row["identifier"], "value": row["value"],
                         "failure": failure, "why": why})


# ---- the operator's re-drive of set-aside rows (`codeplan stripe outbox retry`) ------------------

class Redriven(msgspec.Struct, frozen=True):
    """What `redrive` did with one set-aside row: `outcome` is `resent` (back to 'sending', sent by
    the worker's next pass with its identifier), or why it stays 'failed': `too_old` (Stripe would
    refuse it: bill that usage by hand) or `maybe_recorded` (see `redrive`)."""
    id: int
    stripe_customer_id: str
    minute: dt.datetime
    value: int
    identifier: str
    failure: str | None
    last_error: str | None
    outcome: str
    # resent usage of a billing period already over: Stripe records it, but bills it only while
    # that period's invoice is still a draft (about an hour after the period ends)
    period_over: bool = False


_FAILED_SQL = f"""
SELECT o.id, o.stripe_customer_id, o.minute, o.value, o.identifier, o.failure, o.last_error,
       {_TOO_OLD} AS too_old,
       -- Stripe holds nothing of a row whose only attempt it refused outright (a crashed attempt
       -- before it shared its idempotency key, and that key got a refusal). `attempts` = 0 proves
       -- nothing: an attempt's count rolls back with it when the process dies after Stripe
       -- recorded the event and before the commit, so such a row may have been recorded
       (o.failure = 'refused' AND o.attempts = 1) AS never_recorded,
       NOT coalesce({_UNCONFIRMABLE}, false) AS remembered,
       coalesce(o.period_start < (SELECT max(m.current_period_start) FROM stripe_subscriptions m
                                   WHERE m.stripe_customer_id = o.stripe_customer_id), false) AS period_over
  FROM meter_outbox o
 WHERE o.state = 'failed' AND ($1::bigint IS NULL OR o.id = $1)
 ORDER BY o.id
   FOR UPDATE OF o
"""


async def redrive(conn: asyncpg.Connection, row_id: int | None = None, actor: str = "cli") -> list[Redriven]:
    """Send set-aside rows again (all of them, or row `row_id`), with the identifier each was made
    with, when that cannot count their usage twice:

    - a row never attempted, or refused outright at its only attempt, was never recorded by Stripe:
      it goes back to 'sending' with a new 23-hour window to be confirmed in;
    - a row frozen less than 23 hours ago goes back as it is: had an earlier attempt been recorded
      (its answer lost), Stripe still remembers the identifier and answers the resend "already
      exists", which counts it sent, once;
    - any other row may have been recorded by an attempt whose answer was lost, and Stripe has
      forgotten its identifier: it stays 'failed' (`maybe_recorded`) until someone checks the
      meter's events on Stripe;
    - a row whose minute is older than the 35 days Stripe accepts stays 'failed' (`too_old`).

    Each row resent is written to admin_audit in the same transaction. The worker takes rows back
    to 'sending' only from here; it never re-drives a failed row by itself."""
    from ..admin import audit  # the audit's writer; loaded only by the command

    done: list[Redriven] = []
    async with conn.transaction():
        rows = await conn.fetch(_FAILED_SQL, row_id)
        for row in rows:
            outcome = ("too_old" if row["too_old"] else
                       "resent" if row["never_recorded"] or row["remembered"] else "maybe_recorded")
            if outcome == "resent":
                await conn.execute(
                    "UPDATE meter_outbox SET state = 'sending', failure = NULL, next_attempt_at = now(),"
                    " frozen_at = CASE WHEN $2 THEN now() ELSE frozen_at END WHERE id = $1",
                    row["id"], row["never_recorded"])
                await audit.record(conn, actor, "outbox.retry", f"meter_outbox:{row['id']}",
                                   {"state": "failed", "failure": row["failure"], "last_error": row["last_error"]},
                                   {"state": "sending", "identifier": row["identifier"]})
            done.append(Redriven(id=row["id"], stripe_customer_id=row["stripe_customer_id"], minute=row["minute"],
                                 value=row["value"], identifier=row["identifier"], failure=row["failure"],
                                 last_error=row["last_error"], outcome=outcome,
                                 period_over=outcome == "resent" and row["period_over"]))
    resent = [r.id for r in done if r.outcome == "resent"]
    if resent:
        log.warning("set-aside meter events sent again", extra={"outbox": resent[:50], "count": len(resent),
                                                                "actor": actor})
    return done


_LEFT = {
    "too_old": "left failed: its minute is older than the 35 days Stripe accepts a meter event for; "
               "bill that usage by hand",
    "maybe_recorded": "left failed: an earlier attempt may have been recorded (its answer lost) and Stripe no "
                      "longer remembers its identifier; look for it among the meter's events on Stripe",
}


def redrive_lines(done: list[Redriven]) -> list[str]:
    """What `codeplan stripe outbox retry` prints: a line per row, then the totals."""
    lines = []
    for row in done:
        head = (f"row {row.id}: {row.stripe_customer_id} {row.minute:%Y-%m-%d %H:%M} UTC, {row.value:,} tokens"
                f" ({row.failure or 'unconfirmed'}: {row.last_error or '-'})")
        if row.outcome == "resent":
            what = f"back to sending, identifier {row.identifier}"
            if row.period_over:
                what += ("; its billing period is over: Stripe bills it only if that period's invoice is still "
                         "a draft")
        else:
            what = _LEFT[row.outcome]
        lines.append(f"{head}: {what}")
    resent = sum(row.outcome == "resent" for row in done)
    lines.append(f"{resent} row(s) back to sending, {len(done) - resent} left failed")
    return lines
