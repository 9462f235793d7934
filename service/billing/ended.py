"""An ended subscription's invoices, settled: the open ones voided on Stripe, a payment that still
lands on one refunded.

Cancelling a subscription (Stripe's dunning after its last retry, with after_retries = canceled;
the Dashboard; a customer deleted) stops automatic collection only: Stripe leaves its finalized
invoices open, and their hosted pages (and the Portal) still take a payment. Paid, such an invoice
buys nothing: the subscription is over and Stripe does not bring a cancelled one back. So when the
event applier sees a subscription ended (apply.py) it queues it in `ended_subscription_invoices`
(0052), again at every later event that names it or one of its invoices, and the billing worker
settles it here: each open invoice made before its end is voided, and each invoice that was still unpaid when the
subscription ended and was paid since (created before the end, paid at or after it; a final invoice
Stripe makes and charges at the cancellation itself is for what was served, and is kept) is refunded
in full. Until it is voided, the billing state does not offer such an invoice's page (state.py).

As for a duplicate subscription (duplicates.py): every call carries an idempotency key naming what
it does, what is done is read back from Stripe before it is asked again (a voided invoice, a charge
refunded in full), the row is claimed `FOR UPDATE SKIP LOCKED` under the subscription's advisory
lock (the event applier's), failures are retried with backoff, and a refusal for good is logged for
the operator. No account row is locked while Stripe answers.
"""
from __future__ import annotations

import logging
import asyncpg

from . import stripe, wire  # stripe: loaded on first use (service/billing/__init__.py)
from .refunds import refund_invoice
from .stripe_api import StripeAPI, describe, idempotency_key, retry_delay, retryable

log = logging.getLogger("codeplan.billing.ended")

ENDED = ("canceled", "incomplete_expired")


class EndedInvoices:
    def __init__(self, pool: asyncpg.Pool, api: StripeAPI, installation: str, retry_base: float) -> None:
        self._pool = pool
        self._api = api
        self._installation = installation
        self._retry_base = retry_base

    async def run_once(self) -> bool:
        """Settle the next due ended subscription's invoices. False when none is due."""
        async with self._pool.acquire() as conn, conn.transaction():
            # the subscription's lock first, then its row: the event applier takes them in that
            # order (it queues the row again under the lock), so the other order deadlocked
            ident = await conn.fetchval(
                "SELECT stripe_subscription_id FROM ended_subscription_invoices WHERE state = 'pending'"
                " AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT 1")
            if ident is None:
                return False
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "stripe:" + ident)
            row = await conn.fetchrow(
                "SELECT * FROM ended_subscription_invoices WHERE stripe_subscription_id = $1"
                " AND state = 'pending' AND next_attempt_at <= now() FOR UPDATE SKIP LOCKED", ident)
            if row is None:
                return True  # settled by another process meanwhile
            await conn.execute("UPDATE ended_subscription_invoices SET attempts = attempts + 1"
                               " WHERE stripe_subscription_id = $1", ident)
            try:
                voided, refunded = await self._settle(ident, row["account_id"])
            except stripe.StripeError as exc:
                if retryable(exc) or isinstance(exc, stripe.AuthenticationError):
                    delay = retry_delay(self._retry_base, row["attempts"], 3600.0)
                    await conn.execute(
                        "UPDATE ended_subscription_invoices SET last_error = $2,"
                        " next_attempt_at = now() + make_interval(secs => $3) WHERE stripe_subscription_id = $1",
                        ident, describe(exc), delay)
                    log.warning("ended subscription's invoices not settled yet; retried later",
                                extra={"subscription": ident, "error": describe(exc), "retry_in": round(delay, 2)})
                else:
                    await conn.execute("UPDATE ended_subscription_invoices SET state = 'failed', last_error = $2"
                                       " WHERE stripe_subscription_id = $1", ident, describe(exc))
                    log.error("ended subscription's invoices could not be settled; void its open invoices and "
                              "refund late payments on Stripe",
                              extra={"subscription": ident, "account": row["account_id"], "error": describe(exc)})
                return True
            await conn.execute(
                "UPDATE ended_subscription_invoices SET state = 'done', voided = voided + $2,"
                " refunded_amount = refunded_amount + $3, attempts = 0, last_error = NULL, done_at = now()"
                " WHERE stripe_subscription_id = $1", ident, voided, refunded)
            if voided or refunded:
                log.warning("ended subscription's invoices settled", extra={
                    "subscription": ident, "account": row["account_id"], "voided": voided, "refunded": refunded})
        return True

    async def _settle(self, ident: str, account: int) -> tuple[int, int]:
        """Void the open invoices of ended subscription `ident`, refund those paid after its end;
        how many were voided and the amount refunded now."""
        sub = await self._api.subscription(ident)
        if sub.status not in ENDED or sub.ended_at is None:
            return 0, 0
        voided = refunded = 0
        for invoice in await self._api.invoices_of(ident):
            # only an invoice made before the end, billing nothing already served: one Stripe
            # makes at or after it (the last period's metered overage, an `invoice_now`
            # cancellation's) bills what was served, and so does a renewal's line for the last
            # period's overage (in arrears, beside the next period's fee): those stay payable,
            # and a late payment of one is refunded all but what was served
            served = invoice.served_amount()
            if invoice.status == "open" and invoice.created < sub.ended_at and served == 0:
                try:
                    invoice = await self._api.void_invoice(
                        invoice.id, idempotency_key(self._installation, "ended-void", invoice.id))
                    voided += 1 if invoice.status == "void" else 0
                except stripe.InvalidRequestError:
                    # no longer open: paid (or voided) meanwhile; Stripe says which
                    invoice = await self._api.invoice(invoice.id)
                    if invoice.status == "open":
                        raise
            paid_at = invoice.status_transitions.paid_at
            if (invoice.status == "paid" and invoice.amount_paid > 0 and paid_at is not None
                    and invoice.created < sub.ended_at <= paid_at):
                if served is None:
                    log.error("a payment after its subscription ended not refunded: the invoice's lines "
                              "could not all be read; refund its unserved part on Stripe",
                              extra={"subscription": ident, "invoice": invoice.id, "account": account})
                    continue
                refunded += await self._refund(invoice, account, invoice.amount_paid - served)
        return voided, refunded

    async def _refund(self, invoice: wire.Invoice, account: int, owed: int) -> int:
        return await refund_invoice(self._api, self._installation, invoice, account, owed,
                                    purpose="ended-refund", reason="paid after its subscription ended")
