"""An upgrade's proration invoice whose period is over, settled: voided on Stripe while it is
open, a payment of it that landed after that period's end refunded in full.

An upgrade invoiced at once (the Portal's "always invoice") bills the difference between the two
prices over what is left of the period, in an invoice of its own (billing_reason
subscription_update, every line a proration). Declined, it stays open and Stripe keeps retrying
it, past the period's end too, while the subscription renews and its renewals are paid. Codeplan
serves the larger plan only once that invoice is paid (0046, 0058), so an upgrade unpaid when its
period ends was never served in it: paid later (a retry with a card fixed meanwhile, its hosted
page, the Portal), it charges a price for days only the plan paid for was served.

So when the event applier sees a subscription's current period begin after such an invoice was
made (apply.py), it queues the invoice in `stale_proration_invoices` (0058), and the billing
worker settles it here: open (or uncollectible), it is voided; paid at or after the end of its
period (the earlier of its lines' end and the start of the subscription's current period: a
change of billing interval cuts a period short), what was paid is refunded in full (paid before,
the upgrade was served from then, and it is kept). Until it is voided, the billing state does not
offer its page (state.py).

Not when a change of billing interval cut the period short (month to year while the upgrade was
unpaid): Stripe's switch invoice credits the unused rest of the period at the upgraded price, as
though it had been paid. Voided whole, the customer keeps that credit for days never paid; left
to be paid, it charges the upgraded price for days only the paid plan was served. Only part of it
is owed, which no void or refund here can say: the row is left `failed` and an error logged for
the operator, who credits the unserved part on Stripe (a credit note on the invoice).

As ended.py does for an ended subscription's invoices, and with its refund: every call carries an
idempotency key naming what it does, what is done is read back from Stripe before it is asked
again (a voided invoice, a charge refunded), the row is claimed `FOR UPDATE SKIP LOCKED` under the
subscription's advisory lock (the event applier's, taken first), failures are retried with
backoff, and a refusal for good is logged for the operator. No account row is locked while
Stripe answers.
"""
from __future__ import annotations

import logging

import asyncpg

from . import stripe, wire  # stripe: loaded on first use (service/billing/__init__.py)
from .refunds import refund_invoice
from .stripe_api import StripeAPI, describe, idempotency_key, retry_delay, retryable

log = logging.getLogger("codeplan.billing.prorations")


class _CutShort(Exception):
    """The invoice's period was cut short by a change of billing interval: the operator's."""


class StaleProrations:
    def __init__(self, pool: asyncpg.Pool, api: StripeAPI, installation: str, retry_base: float) -> None:
        self._pool = pool
        self._api = api
        self._installation = installation
        self._retry_base = retry_base

    async def run_once(self) -> bool:
        """Settle the next due stale proration invoice. False when none is due."""
        async with self._pool.acquire() as conn, conn.transaction():
            # the subscription's lock first, then the row: the event applier queues rows under
            # that lock (ended.py's order)
            found = await conn.fetchrow(
                "SELECT stripe_invoice_id, stripe_subscription_id FROM stale_proration_invoices"
                " WHERE state = 'pending' AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT 1")
            if found is None:
                return False
            ident, subscription = found["stripe_invoice_id"], found["stripe_subscription_id"]
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "stripe:" + subscription)
            row = await conn.fetchrow(
                "SELECT * FROM stale_proration_invoices WHERE stripe_invoice_id = $1"
                " AND state = 'pending' AND next_attempt_at <= now() FOR UPDATE SKIP LOCKED", ident)
            if row is None:
                return True  # settled by another process meanwhile
            await conn.execute("UPDATE stale_proration_invoices SET attempts = attempts + 1"
                               " WHERE stripe_invoice_id = $1", ident)
            try:
                voided, refunded = await self._settle(ident, subscription, row["account_id"])
            except _CutShort as cut:
                await conn.execute("UPDATE stale_proration_invoices SET state = 'failed', last_error = $2"
                                   " WHERE stripe_invoice_id = $1", ident, str(cut))
                log.error("an upgrade's proration invoice whose period a change of billing interval cut short is "
                          "left open: credit its unserved part on Stripe (a credit note on the invoice)",
                          extra={"invoice": ident, "subscription": subscription, "account": row["account_id"],
                                 "reason": str(cut)})
                return True
            except stripe.StripeError as exc:
                if retryable(exc) or isinstance(exc, stripe.AuthenticationError):
                    delay = retry_delay(self._retry_base, row["attempts"], 3600.0)
                    await conn.execute(
                        "UPDATE stale_proration_invoices SET last_error = $2,"
                        " next_attempt_at = now() + make_interval(secs => $3) WHERE stripe_invoice_id = $1",
                        ident, describe(exc), delay)
                    log.warning("stale proration invoice not settled yet; retried later",
                                extra={"invoice": ident, "error": describe(exc), "retry_in": round(delay, 2)})
                else:
                    await conn.execute("UPDATE stale_proration_invoices SET state = 'failed', last_error = $2"
                                       " WHERE stripe_invoice_id = $1", ident, describe(exc))
                    log.error("an upgrade's proration invoice whose period is over could not be settled; void it "
                              "(or refund its late payment) on Stripe",
                              extra={"invoice": ident, "subscription": subscription, "account": row["account_id"],
                                     "error": describe(exc)})
                return True
            await conn.execute(
                "UPDATE stale_proration_invoices SET state = 'done', voided = voided OR $2,"
                " refunded_amount = refunded_amount + $3, attempts = 0, last_error = NULL, done_at = now()"
                " WHERE stripe_invoice_id = $1", ident, voided, refunded)
            if voided or refunded:
                log.warning("an upgrade's proration invoice whose period is over settled", extra={
                    "invoice": ident, "subscription": subscription, "account": row["account_id"],
                    "voided": voided, "refunded": refunded})
        return True

    async def _settle(self, ident: str, subscription: str, account: int) -> tuple[bool, int]:
        """Void invoice `ident` if it is an upgrade's proration of a period of `subscription` now
        over and still open; refund a payment of it made after that period's end. Whether it was
        voided now, and the amount refunded now."""
        sub = await self._api.subscription(subscription)
        item = sub.plan_item
        invoice = await self._api.invoice(ident)
        if item is None or item.current_period_start is None or invoice.billing_reason != "subscription_update":
            return False, 0
        lines = invoice.lines.data if invoice.lines is not None and not invoice.lines.has_more \
            else await self._api.invoice_lines(ident)
        if not invoice.prorations_only(lines) or invoice.created >= item.current_period_start:
            return False, 0  # bills a period too, or prorates the current one: not this worker's
        # its period's end: where its lines end, unless the period was cut short (a change of
        # billing interval starts a new one at once)
        lines_end = max(line.period.end for line in lines)
        over_at = min(lines_end, item.current_period_start)
        paid_late = invoice.status == "paid" and (invoice.status_transitions.paid_at or 0) >= over_at
        if over_at < lines_end and (invoice.status in ("open", "uncollectible") or paid_late):
            # the switch credited the rest at the upgraded price (module docstring): neither a
            # void nor a refund in full is right, only the operator can settle it
            raise _CutShort("a change of billing interval cut its period short; the switch credited the "
                            "rest at the upgraded price")
        voided = False
        if invoice.status in ("open", "uncollectible"):
            try:
                invoice = await self._api.void_invoice(
                    ident, idempotency_key(self._installation, "stale-proration-void", ident))
                voided = invoice.status == "void"
            except stripe.InvalidRequestError:
                # no longer open: paid (or voided) meanwhile; Stripe says which
                invoice = await self._api.invoice(ident)
                if invoice.status in ("open", "uncollectible"):
                    raise
        paid_at = invoice.status_transitions.paid_at
        refunded = 0
        if invoice.status == "paid" and invoice.amount_paid > 0 and paid_at is not None and paid_at >= over_at:
            refunded = await refund_invoice(
                self._api, self._installation, invoice, account, invoice.amount_paid,
                purpose="stale-proration-refund", reason="an upgrade paid after its period ended, never served")
        return voided, refunded
