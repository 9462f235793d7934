"""The effects of webhook events, applied from the durable queue (`stripe_events`).

An event says only that something changed. Events come late, twice, out of order, so none is
applied from its own payload: the object it names is read again from Stripe, under a lock on that
object (a transaction-scoped advisory lock), and its current state is applied. Two events for one
subscription, in either order, leave what Stripe holds now; an older state is never applied over a
newer one, since a later read always sees at least what an earlier one saw.

Each event leaves 'pending' in the same transaction as its effect; a failure (Stripe unreachable)
rolls the effect back and the event is retried later with backoff.
"""
from __future__ import annotations

import datetime as dt
import logging

import asyncpg
import msgspec

from ..config import Config
from . import stripe, wire  # stripe: loaded on first use (service/billing/__init__.py)
from .stripe_api import StripeAPI, describe, retry_delay

log = logging.getLogger("codeplan.billing")

SUBSCRIPTION_EVENTS = {
    "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
    "customer.subscription.paused", "customer.subscription.resumed", "customer.subscription.trial_will_end",
    "customer.subscription.pending_update_applied", "customer.subscription.pending_update_expired"}
INVOICE_EVENTS = {
    "invoice.paid": None, "invoice.payment_succeeded": None, "invoice.finalized": None,
    "invoice.updated": None, "invoice.voided": None, "invoice.marked_uncollectible": None,
    "invoice.payment_failed": "payment_failed", "invoice.payment_action_required": "action_required"}
CHECKOUT_EVENTS = {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
# a customer deleted on Stripe (Dashboard, a GDPR request): the account forgets it
CUSTOMER_EVENTS = {"customer.deleted"}
# Stripe's states of a subscription that has ended for good
ENDED = ("canceled", "incomplete_expired")
# what of a top-up's payment we keep: refunds, and disputes (chargebacks), which withdraw money
# without refunding it
MONEY_BACK_EVENTS = {
    "charge.refunded", "charge.refund.updated", "refund.created", "refund.updated", "refund.failed",
    "charge.dispute.created", "charge.dispute.updated", "charge.dispute.closed",
    "charge.dispute.funds_withdrawn", "charge.dispute.funds_reinstated"}

_ref = msgspec.json.Decoder(wire.Ref)
_invoice_ref = msgspec.json.Decoder(wire.Invoice)
_refund_ref = msgspec.json.Decoder(wire.Refund)
_dispute_ref = msgspec.json.Decoder(wire.Dispute)
_event = msgspec.json.Decoder(wire.Event)


def _ts(value: int | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.timezone.utc)


class Ignored(Exception):
    """The event names nothing of ours (another integration's customer, an unknown price)."""


class EventApplier:
    def __init__(self, pool: asyncpg.Pool, api: StripeAPI, config: Config, retry_base: float,
                 installation: str = "") -> None:
        self._pool = pool
        self._api = api
        self._config = config
        self._retry_base = retry_base
        self._installation = installation

    def _ours(self, what: str, meta: dict[str, str]) -> None:
        """Objects our Checkout made carry this installation's id: one that names another (a
        staging copy, a second database on the same Stripe account, whose account ids overlap
        ours) is not ours to apply. Objects made before the id was written carry none."""
        named = meta.get("codeplan_installation")
        if named and self._installation and named != self._installation:
            raise Ignored(f"{what} belongs to another Codeplan installation")

    async def run_once(self) -> bool:
        """Apply the next due event. False when none is due."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT id, type, payload::text AS payload, attempts FROM stripe_events"
                " WHERE state = 'pending' AND next_attempt_at <= now()"
                " ORDER BY created, received_at LIMIT 1 FOR UPDATE SKIP LOCKED")
            if row is None:
                return False
            event = _event.decode(row["payload"])
            try:
                async with conn.transaction():  # a savepoint: a failure undoes the effect only
                    state = await self._apply(conn, event)
                    await conn.execute(
                        "UPDATE stripe_events SET state = $2, processed_at = now(), attempts = attempts + 1,"
                        " last_error = NULL WHERE id = $1", event.id, state)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the event waits and is retried
                error = describe(exc) if isinstance(exc, stripe.StripeError) else type(exc).__name__
                if not isinstance(exc, (stripe.StripeError, asyncpg.PostgresError, OSError)):
                    log.error("stripe event raised", exc_info=exc, extra={"event": event.id})
                delay = retry_delay(self._retry_base, row["attempts"], 3600.0)
                await conn.execute(
                    "UPDATE stripe_events SET attempts = attempts + 1, last_error = $2,"
                    " next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1", event.id, error, delay)
                log.warning("stripe event failed; retried later",
                            extra={"event": event.id, "type": event.type, "error": error,
                                   "attempt": row["attempts"] + 1, "retry_in": round(delay, 2)})
        return True

    async def _apply(self, conn: asyncpg.Connection, event: wire.Event) -> str:
        raw = event.data.object
        try:
            if event.type in SUBSCRIPTION_EVENTS:
                await self.subscription(conn, _ref.decode(raw).id or "")
            elif event.type in INVOICE_EVENTS:
                invoice = _invoice_ref.decode(raw)
                await self.invoice(conn, invoice.id, invoice.subscription, INVOICE_EVENTS[event.type])
            elif event.type in CHECKOUT_EVENTS:
                await self.checkout(conn, _ref.decode(raw).id or "")
            elif event.type in CUSTOMER_EVENTS:
                await self.customer_deleted(conn, _ref.decode(raw).id or "")
            elif event.type in MONEY_BACK_EVENTS:
                # a refund's or a dispute's events carry that object (charge.refund.updated a
                # refund too), charge.refunded the charge
                kind = _ref.decode(raw).object
                charge = (_refund_ref.decode(raw).charge if kind == "refund"
                          else _dispute_ref.decode(raw).charge if kind == "dispute" else _ref.decode(raw).id)
                if charge:
                    await self.money_back(conn, charge)
            else:
                return "ignored"
        except stripe.InvalidRequestError as exc:
            if exc.http_status != 404 or exc.code != "resource_missing":
                raise
            # what the event names does not exist (any more) on Stripe: nothing to apply
            log.warning("stripe event names a missing object", extra={"event": event.id, "type": event.type,
                                                                       "error": describe(exc)})
            return "ignored"
        except Ignored as why:
            log.info("stripe event ignored", extra={"event": event.id, "type": event.type, "why": str(why)})
            return "ignored"
        return "applied"

    @staticmethod
    async def _lock(conn: asyncpg.Connection, stripe_id: str) -> None:
        """Serialises everything done about one Stripe object until this transaction ends, so a
        read from Stripe and the write of what it said are never overtaken by an older read."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "stripe:" + stripe_id)

    async def _account(self, conn: asyncpg.Connection, customer: str | None, meta: dict[str, str],
                       subscription: str | None = None) -> int:
        if customer:
            account = await conn.fetchval("SELECT id FROM accounts WHERE stripe_customer_id = $1", customer)
            if account is not None:
                return account
        if subscription:
            # a subscription we hold already, whose customer the account no longer stores (deleted
            # on Stripe, customer.deleted applied first): still that account's
            account = await conn.fetchval("SELECT account_id FROM stripe_subscriptions"
                                          " WHERE stripe_subscription_id = $1", subscription)
            if account is not None:
                return account
        claimed = meta.get("codeplan_account_id", "")
        if claimed.isdigit() and customer and not await self._api.customer_gone(customer):
            # made by our Checkout for this account, before the customer id was stored here
            linked = await conn.fetchval(
                "UPDATE accounts SET stripe_customer_id = $2 WHERE id = $1 AND stripe_customer_id IS NULL"
                " RETURNING id", int(claimed), customer)
            if linked is not None:
                return linked
        raise Ignored(f"customer {customer} is not a Codeplan account's")

    async def _plan(self, conn: asyncpg.Connection, price: wire.Price) -> str | None:
        plan = await conn.fetchval("SELECT plan_id FROM stripe_prices WHERE stripe_price_id = $1", price.id)
        if plan is None and price.metadata.get("codeplan_plan"):
            plan = await conn.fetchval("SELECT id FROM plans WHERE id = $1", price.metadata["codeplan_plan"])
        return plan

    async def subscription(self, conn: asyncpg.Connection, stripe_id: str, *, depth: int = 0,
                           recorded: str | None = None) -> None:
        await self._lock(conn, stripe_id)
        sub = await self._api.subscription(stripe_id)
        self._ours(f"subscription {sub.id}", sub.metadata)
        account = await self._account(conn, sub.customer, sub.metadata, sub.id)
        if sub.status == "past_due" and sub.latest_invoice and sub.latest_invoice != recorded:
            # what keeps it past_due decides what is served (only an upgrade's proration unpaid:
            # the plan paid for, no grace, no change of plan; 0053), and the event of the invoice
            # that made it past_due may come after this one: it is read now (one more read of
            # Stripe, for past_due subscriptions only)
            await self._record_invoice(conn, await self._api.invoice(sub.latest_invoice), account, None)
        item = sub.plan_item
        plan = await self._plan(conn, item.price) if item else None
        overage = False
        for other in sub.items.data:
            recurring = other.price.recurring
            if recurring is not None and recurring.usage_type == "metered":
                overage = overage or other.price.metadata.get("codeplan_kind") == "overage" or bool(
                    await conn.fetchval("SELECT 1 FROM stripe_prices WHERE stripe_price_id = $1 AND kind = 'overage'",
                                        other.price.id))
        args = (sub.id, account, sub.customer, sub.status, plan, item.price.id if item else None,
                _ts(item.current_period_start if item else None), _ts(item.current_period_end if item else None),
                overage, sub.cancel_at_period_end, _ts(sub.cancel_at), _ts(sub.ended_at), self._config.past_due_grace)
        sql = "SELECT * FROM billing_apply_subscription($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        row = await conn.fetchrow(sql, *args)
        outcome = row["outcome"]
        if outcome == "conflict" and depth == 0:
            # the account's subscription is driven by another Stripe subscription that our mirror
            # still thinks is live: read that one first (its end may not have reached us yet)
            await self.subscription(conn, row["detail"], depth=1)
            row = await conn.fetchrow(sql, *args)
            outcome = row["outcome"]
        if outcome == "conflict":
            # paid twice (two Checkouts opened before either was paid): the one that drives the
            # account stays; this one is cancelled and refunded by the worker (duplicates.py)
            await conn.execute(
                "INSERT INTO duplicate_subscriptions (stripe_subscription_id, account_id, kept_subscription_id)"
                " VALUES ($1, $2, $3) ON CONFLICT (stripe_subscription_id) DO NOTHING", sub.id, account, row["detail"])
            log.error("two live Stripe subscriptions for one account; the second is cancelled and refunded",
                      extra={"account": account, "subscription": sub.id, "other": row["detail"]})
        elif outcome == "closed":
            # paid after the account was closed (a Checkout opened before, its page payable for 24
            # hours): never served (billing_apply_subscription, 0059); the worker cancels it and
            # refunds what it charged, as a duplicate's (duplicates.py)
            await conn.execute(
                "INSERT INTO duplicate_subscriptions (stripe_subscription_id, account_id, reason)"
                " VALUES ($1, $2, 'account_closed') ON CONFLICT (stripe_subscription_id) DO NOTHING", sub.id, account)
            log.warning("subscription for a closed account; it is cancelled and refunded",
                        extra={"account": account, "subscription": sub.id, "stripe_status": sub.status})
        elif outcome == "unknown_plan":
            log.error("subscription to a price that maps to no plan",
                      extra={"subscription": sub.id, "price": row["detail"]})
        elif outcome == "applied":
            log.info("subscription synced", extra={"subscription": sub.id, "stripe_status": sub.status,
                                                   "plan": plan, "status": row["detail"]})
        if sub.status in ENDED:
            # its invoices outlive it on Stripe, open and payable: the worker voids those and
            # refunds a payment made after its end (ended.py); again at each event naming it
            await conn.execute(
                "INSERT INTO ended_subscription_invoices (stripe_subscription_id, account_id) VALUES ($1, $2)"
                " ON CONFLICT (stripe_subscription_id) DO UPDATE SET state = 'pending', next_attempt_at = now()",
                sub.id, account)
        else:
            # an upgrade's proration invoice made in a period now over prorates a plan served only
            # once it is paid, so never in that period: the worker voids it if it is open, refunds a
            # payment of it that landed after the period's end (prorations.py). Each such invoice
            # is queued once, when its subscription's period is seen to have moved past it (open),
            # or when it is seen paid since (0058).
            await conn.execute(
                "INSERT INTO stale_proration_invoices (stripe_invoice_id, stripe_subscription_id, account_id)"
                " SELECT i.stripe_invoice_id, i.stripe_subscription_id, i.account_id FROM billing_invoices i"
                " JOIN stripe_subscriptions m ON m.stripe_subscription_id = i.stripe_subscription_id"
                " WHERE i.stripe_subscription_id = $1 AND i.billing_reason = 'subscription_update'"
                "   AND i.prorations_only AND i.created_at < m.current_period_start"
                "   AND (i.status IN ('open', 'uncollectible')"
                "        OR (i.status = 'paid' AND i.amount_paid > 0 AND i.paid_at >= m.current_period_start))"
                " ON CONFLICT (stripe_invoice_id) DO NOTHING", sub.id)

    async def invoice(self, conn: asyncpg.Connection, invoice_id: str, subscription: str | None,
                      problem: str | None) -> None:
        await self._lock(conn, subscription or invoice_id)
        invoice = await self._api.invoice(invoice_id)
        try:
            account = await self._account(conn, invoice.customer, {}, invoice.subscription)
        except Ignored:
            if not invoice.subscription:
                raise
            # our Checkout's subscription whose customer we have not linked yet: sync it first
            await self.subscription(conn, invoice.subscription)
            account = await self._account(conn, invoice.customer, {}, invoice.subscription)
        await self._record_invoice(conn, invoice, account, problem)
        if invoice.subscription:
            await self.subscription(conn, invoice.subscription, recorded=invoice.id)

    async def _record_invoice(self, conn: asyncpg.Connection, invoice: wire.Invoice, account: int,
                              problem: str | None) -> None:
        # whether it bills only an upgrade's proration (the plan paid for stays served while it is
        # unpaid, billing_only_upgrade_unpaid, 0053) or also a new period (a change of billing
        # interval: its grace runs). Told by its lines; one with more lines than it carries has
        # them read (a subscription_update one: the only kind it matters for). When it was first
        # seen owed (unpaid_since, our clock) is where a grace over it starts (0059): Stripe
        # attempts an invoice when it finalizes it, so that is its first failure
        prorations_only = invoice.prorations_only()
        if prorations_only is None and invoice.billing_reason == "subscription_update":
            prorations_only = invoice.prorations_only(await self._api.invoice_lines(invoice.id))
        await conn.execute(
            """INSERT INTO billing_invoices AS i (stripe_invoice_id, account_id, stripe_subscription_id, status,
                   billing_reason, amount_due, amount_paid, currency, attempt_count, payment_problem,
                   period_start, period_end, hosted_invoice_url, paid_at, created_at, prorations_only,
                   unpaid_since)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN $4 = 'open' THEN $10 END, $11, $12, $13,
                       $14, $15, $16, CASE WHEN $4 IN ('open', 'uncollectible') THEN now() END)
               ON CONFLICT (stripe_invoice_id) DO UPDATE SET
                   status = excluded.status, amount_due = excluded.amount_due, amount_paid = excluded.amount_paid,
                   attempt_count = excluded.attempt_count, hosted_invoice_url = excluded.hosted_invoice_url,
                   paid_at = excluded.paid_at,
                   payment_problem = CASE WHEN excluded.status = 'open'
                                          THEN coalesce($10, i.payment_problem) END,
                   prorations_only = coalesce(excluded.prorations_only, i.prorations_only),
                   unpaid_since = coalesce(i.unpaid_since, excluded.unpaid_since),
                   updated_at = now()""",
            invoice.id, account, invoice.subscription, invoice.status or "draft", invoice.billing_reason,
            invoice.amount_due, invoice.amount_paid, invoice.currency, invoice.attempt_count, problem,
            _ts(invoice.period_start), _ts(invoice.period_end), invoice.hosted_invoice_url,
            _ts(invoice.status_transitions.paid_at), _ts(invoice.created), prorations_only)

    async def checkout(self, conn: asyncpg.Connection, session_id: str) -> None:
        await self._lock(conn, session_id)
        session = await self._api.checkout_session(session_id)
        self._ours(f"checkout session {session.id}", session.metadata)
        reference = session.client_reference_id or ""
        if not reference.isdigit():
            raise Ignored(f"checkout session {session.id} names no Codeplan account")
        account = int(reference)
        found = await conn.fetchrow("SELECT stripe_customer_id FROM accounts WHERE id = $1", account)
        if found is None:
            raise Ignored(f"checkout session {session.id} names unknown account {account}")
        if session.customer and found["stripe_customer_id"] not in (None, session.customer):
            # our sessions are opened for the account's own Customer: this one is another's
            raise Ignored(f"checkout session {session.id} is not account {account}'s customer's")
        if session.customer and found["stripe_customer_id"] is None and not await self._api.customer_gone(
                session.customer):
            await conn.execute("UPDATE accounts SET stripe_customer_id = $2 WHERE id = $1 AND stripe_customer_id IS NULL",
                               account, session.customer)
        if session.mode == "subscription" and session.subscription:
            await self.subscription(conn, session.subscription)
        elif session.mode == "payment" and session.payment_status == "paid":
            await self._topup(conn, account, session)

    async def customer_deleted(self, conn: asyncpg.Connection, customer_id: str) -> None:
        """A customer deleted on Stripe (its subscriptions ended with it, each with its own event):
        the account that stored it forgets it, so its next purchase makes a new one."""
        await self._lock(conn, customer_id)
        if not await self._api.customer_gone(customer_id):
            raise Ignored(f"customer {customer_id} is not deleted on Stripe")
        account = await conn.fetchval("UPDATE accounts SET stripe_customer_id = NULL WHERE stripe_customer_id = $1"
                                      " RETURNING id", customer_id)
        if account is not None:
            log.warning("stripe customer deleted; the account's next purchase makes a new one",
                        extra={"account": account, "customer": customer_id})

    async def _topup(self, conn: asyncpg.Connection, account: int, session: wire.CheckoutSession) -> None:
        tokens = session.metadata.get("codeplan_topup_tokens", "")
        if not tokens.isdigit() or int(tokens) <= 0:
            raise Ignored(f"payment {session.id} is not a Codeplan top-up")
        refunded = disputed = 0
        if session.payment_intent:
            # a refund or a dispute may have come before this purchase was applied (events are
            # unordered)
            await self._lock(conn, session.payment_intent)
            intent = await self._api.payment_intent(session.payment_intent)
            if intent.latest_charge:
                refunded, disputed = await self._not_kept(await self._api.charge(intent.latest_charge))
        # the account's lock, as billing_apply_subscription and identity.close_account take it: a
        # block paid after the close (a Checkout opened before it) is never granted, and its payment
        # is refunded by the worker as a duplicate subscription's are (duplicates.py). One granted
        # before the close (this event delivered again) stays as it is.
        closed = await conn.fetchval("SELECT closed_at IS NOT NULL FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
                                     account)
        if closed and not await conn.fetchval("SELECT 1 FROM topups WHERE stripe_checkout_session_id = $1",
                                              session.id):
            if not session.payment_intent:
                raise Ignored(f"payment {session.id} for closed account {account} names no payment intent")
            await conn.execute(
                "INSERT INTO duplicate_subscriptions (stripe_subscription_id, account_id, reason, stripe_object)"
                " VALUES ($1, $2, 'account_closed', 'payment_intent') ON CONFLICT (stripe_subscription_id) DO NOTHING",
                session.payment_intent, account)
            log.warning("top-up paid for a closed account; it is refunded",
                        extra={"account": account, "session": session.id, "payment_intent": session.payment_intent})
            return
        inserted = await conn.fetchval(
            "INSERT INTO topups (account_id, tokens, amount, currency, expires_at, stripe_checkout_session_id,"
            " stripe_payment_intent_id) VALUES ($1, $2, $3, $4, now() + make_interval(days => $5), $6, $7)"
            " ON CONFLICT (stripe_checkout_session_id) DO NOTHING RETURNING id",
            account, int(tokens), session.amount_total or 0, session.currency or self._config.stripe_currency,
            self._config.topup_valid_days, session.id, session.payment_intent)
        if inserted:
            window = await conn.fetchval("SELECT billing_topup_attach($1)", inserted)
            if (refunded or disputed) and session.payment_intent:
                await conn.fetchval("SELECT billing_topup_money_back($1, $2, $3)", session.payment_intent,
                                    refunded, disputed)
            log.info("top-up bought", extra={"account": account, "tokens": int(tokens), "topup": inserted,
                                             "window": window})

    async def _not_kept(self, charge: wire.Charge) -> tuple[int, int]:
        """What of `charge` is refunded, and what its disputes have withdrawn, as Stripe says now."""
        disputed = 0
        if charge.payment_intent:
            disputed = sum(d.withdrawn for d in await self._api.disputes_of(charge.payment_intent)
                           if d.charge in (None, charge.id))
        return charge.amount_refunded, disputed

    async def money_back(self, conn: asyncpg.Connection, charge_id: str) -> None:
        """A top-up's block revoked in proportion to what of its payment we no longer keep, or
        given back as that falls (a dispute won, a refund that failed)."""
        charge = await self._api.charge(charge_id)
        if not charge.payment_intent:
            raise Ignored(f"charge {charge.id} has no payment intent")
        await self._lock(conn, charge.payment_intent)
        charge = await self._api.charge(charge_id)  # read again under the lock
        refunded, disputed = await self._not_kept(charge)
        change = await conn.fetchval("SELECT billing_topup_money_back($1, $2, $3)", charge.payment_intent,
                                     refunded, disputed)
        if change is None:
            raise Ignored(f"charge {charge.id} is not for a top-up (a subscription's refunds and disputes change "
                          "no allowance)")
        if change:
            log.info("top-up taken back" if change > 0 else "top-up given back", extra={
                "payment_intent": charge.payment_intent, "amount_refunded": refunded, "amount_disputed": disputed,
                "tokens": abs(change)})
