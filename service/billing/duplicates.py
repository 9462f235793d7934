"""A subscription paid twice, or anything paid for a closed account, undone: cancelled on Stripe,
every payment it took refunded.

Checkout lets an account open only one subscription session at a time (sessions.py), but a
session opened before that rule, or one Stripe completed while another was being opened, can
still leave an account with two paid subscriptions. Only one drives the account's allowance;
billing_apply_subscription answers 'conflict' for the other, and the event applier records it in
`duplicate_subscriptions` (0035) in the event's transaction. The billing worker takes it from
there, here: the subscription is cancelled at once (no credit for unused time: the refund below
returns everything) and each payment of its invoices refunded in full, reason `duplicate`.

A closed account is undone the same way (reason `account_closed`, 0059): a Checkout opened
before the close stays payable for 24 hours, and what it buys after the close is never served
(billing_apply_subscription answers 'closed'; a top-up is not granted, apply.py). Its
subscription is cancelled and refunded as above; a top-up's row names its payment intent
(`stripe_object` payment_intent), which is refunded and nothing cancelled. Both refunds say
`requested_by_customer`: the customer closed the account.

Every call carries an idempotency key naming what it undoes, and what is already done is read
back from Stripe before it is asked again (a cancelled subscription, a charge refunded in full),
so a retry after a crash or a lost answer never cancels or refunds twice. The row is claimed
`FOR UPDATE SKIP LOCKED` and the Stripe object's advisory lock is the event applier's (apply.py),
so an event about the same subscription waits until the row is settled and then reads Stripe's
state after it. No account row is locked while Stripe answers.
"""
from __future__ import annotations

import logging

import asyncpg

from . import stripe  # Stripe's library, loaded on first use (service/billing/__init__.py)
from .stripe_api import StripeAPI, describe, idempotency_key, retry_delay, retryable

log = logging.getLogger("codeplan.billing.duplicates")

_ENDED = ("canceled", "incomplete_expired")


class Duplicates:
    def __init__(self, pool: asyncpg.Pool, api: StripeAPI, installation: str, retry_base: float) -> None:
        self._pool = pool
        self._api = api
        self._installation = installation
        self._retry_base = retry_base

    async def run_once(self) -> bool:
        """Undo the next due duplicate. False when none is due."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM duplicate_subscriptions WHERE state = 'pending' AND next_attempt_at <= now()"
                " ORDER BY found_at LIMIT 1 FOR UPDATE SKIP LOCKED")
            if row is None:
                return False
            ident = row["stripe_subscription_id"]
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "stripe:" + ident)
            # the subscription it lost to ended first and this one was adopted: it is the plan now
            # (never a closed account's: billing_apply_subscription refuses to adopt one)
            if row["stripe_object"] == "subscription" and await conn.fetchval(
                    "SELECT subscription_id IS NOT NULL FROM stripe_subscriptions WHERE stripe_subscription_id = $1",
                    ident):
                await conn.execute("UPDATE duplicate_subscriptions SET state = 'moot', done_at = now()"
                                   " WHERE stripe_subscription_id = $1", ident)
                log.info("duplicate subscription drives its account now; left alone", extra={"subscription": ident})
                return True
            await conn.execute("UPDATE duplicate_subscriptions SET attempts = attempts + 1"
                               " WHERE stripe_subscription_id = $1", ident)
            try:
                refunded = await self._undo(row)
            except stripe.StripeError as exc:
                if retryable(exc) or isinstance(exc, stripe.AuthenticationError):
                    delay = retry_delay(self._retry_base, row["attempts"], 3600.0)
                    await conn.execute(
                        "UPDATE duplicate_subscriptions SET last_error = $2,"
                        " next_attempt_at = now() + make_interval(secs => $3) WHERE stripe_subscription_id = $1",
                        ident, describe(exc), delay)
                    log.warning("duplicate subscription not undone yet; retried later",
                                extra={"subscription": ident, "error": describe(exc), "retry_in": round(delay, 2)})
                else:
                    await conn.execute("UPDATE duplicate_subscriptions SET state = 'failed', last_error = $2"
                                       " WHERE stripe_subscription_id = $1", ident, describe(exc))
                    log.error("subscription or payment could not be undone; cancel and refund it on Stripe",
                              extra={"subscription": ident, "account": row["account_id"], "reason": row["reason"],
                                     "error": describe(exc)})
                return True
            await conn.execute(
                "UPDATE duplicate_subscriptions SET state = 'done', refunded_amount = $2, last_error = NULL,"
                " done_at = now() WHERE stripe_subscription_id = $1", ident, refunded)
            log.warning("duplicate subscription cancelled and refunded" if row["reason"] == "duplicate"
                        else "closed account's purchase cancelled and refunded",
                        extra={"subscription": ident, "account": row["account_id"], "reason": row["reason"],
                               "kept": row["kept_subscription_id"], "refunded": refunded})
        return True

    async def _undo(self, row: asyncpg.Record) -> int:
        """Cancel the row's subscription and refund every payment it took (a top-up's payment
        intent: refund it); returns the amount refunded in all."""
        ident, account, kept = row["stripe_subscription_id"], row["account_id"], row["kept_subscription_id"]
        closed = row["reason"] == "account_closed"
        # the keys of a duplicate's calls are as they were before 0059 (rows in flight keep theirs)
        purpose = "closed" if closed else "duplicate"
        refund = {"reason": "requested_by_customer", "metadata": {
                      "codeplan_account_id": str(account), "codeplan_reason": "account_closed"}} if closed else {
                  "reason": "duplicate", "metadata": {
                      "codeplan_account_id": str(account), "codeplan_duplicate_of": kept}}
        if row["stripe_object"] == "payment_intent":
            return await self._refund(ident, refund, purpose)
        if (await self._api.subscription(ident)).status not in _ENDED:
            comment = (f"Codeplan: account {account} is closed; this subscription, paid after the close, is "
                       "cancelled and what it charged refunded") if closed else (
                       f"Codeplan: account {account} already pays for {kept}; this second subscription "
                       "is cancelled and what it charged refunded")
            try:
                await self._api.cancel_subscription(ident, {"cancellation_details": {"comment": comment}},
                                                    idempotency_key(self._installation, f"{purpose}-cancel", ident))
            except stripe.InvalidRequestError as exc:
                # Stripe answers a cancelled subscription's cancellation with a 404
                if exc.http_status != 404 or (await self._api.subscription(ident)).status not in _ENDED:
                    raise
        refunded = 0
        for invoice in await self._api.invoices_of(ident):
            if invoice.amount_paid <= 0:
                continue
            for paid in await self._api.invoice_payments(invoice.id):
                intent_id = paid.payment.payment_intent
                if paid.status != "paid" or paid.payment.type != "payment_intent" or not intent_id:
                    continue
                refunded += await self._refund(intent_id, refund, purpose)
        return refunded

    async def _refund(self, intent_id: str, refund: dict, purpose: str) -> int:
        """Refund what is left of `intent_id`'s charge; the charge's amount (0 when it took nothing).
        The key names the charge and what it had refunded before: a retry gets the same refund."""
        intent = await self._api.payment_intent(intent_id)
        if not intent.latest_charge:
            return 0
        charge = await self._api.charge(intent.latest_charge)
        if charge.status != "succeeded":
            return 0
        left = charge.amount - charge.amount_refunded
        if left > 0:
            await self._api.create_refund(
                {"payment_intent": intent_id, "amount": left, **refund},
                idempotency_key(self._installation, f"{purpose}-refund", charge.id, charge.amount_refunded))
        return charge.amount
