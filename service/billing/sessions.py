"""Checkout, Customer Portal and top-up sessions: account id in, a Stripe-hosted URL out.

Free of HTTP, so the API routes (routes.py) and the web pages call the same functions. Every create
carries an idempotency key; each account gets one Stripe Customer, made on first need and reused.

Calls to Stripe take hundreds of milliseconds, seconds when it is slow, and are retried: none is
made while holding a row lock. What must not run twice for one account at once (making its
Customer, opening its Checkout) is serialised by a transaction-scoped advisory lock named after
the account, which nothing else takes: logins, key creation and the ledger never wait for Stripe.
"""
from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any, AsyncIterator

import asyncpg
import msgspec

from ..config import Config, TopupBlock
from . import stripe, wire  # stripe: loaded on first use (service/billing/__init__.py)
from .stripe_api import StripeAPI, idempotency_key


class BillingError(Exception):
    """A billing request that cannot be carried out, worded for the person who made it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # invalid | not_found | conflict | unavailable | suspended | closed
        self.message = message


class SoldPrice(msgspec.Struct, frozen=True):
    plan_id: str
    interval: str
    amount: int
    currency: str


# Stripe states in which a subscription still exists and may be changed in the Portal
LIVE_STATUSES = ("active", "trialing", "past_due", "unpaid", "paused", "incomplete")
_SUBSCRIBED = "this account already has a subscription; change its plan or cancel it in the billing portal"


def _bucket(minutes: int) -> str:
    """A time bucket for idempotency keys of sessions: a double click (or our own retry) within it
    gets the same session; a new visit later gets a new one, as a used session cannot be reused."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%d") + str((now.hour * 60 + now.minute) // minutes)


class Sessions:
    def __init__(self, pool: asyncpg.Pool, api: StripeAPI, config: Config, installation: str) -> None:
        self._pool = pool
        self._api = api
        self._config = config
        self._installation = installation

    @property
    def billing_url(self) -> str:
        return self._config.base_url + "/billing"

    @contextlib.asynccontextmanager
    async def _serialised(self, purpose: str, account_id: int) -> AsyncIterator[asyncpg.Connection]:
        """One at a time per account and purpose, until the block ends: an advisory lock, not a
        row lock, so what only reads or references the account row (a login, a new key or
        session: the foreign key's KEY SHARE) never waits behind a slow Stripe call."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                               f"codeplan:{purpose}:{account_id}")
            yield conn

    async def customer(self, account_id: int) -> str:
        """The account's Stripe Customer, created the first time and stored on the account. One
        deleted on Stripe since (Dashboard, a GDPR request) is forgotten and a new one made."""
        existing = await self._stored_customer(account_id)
        if existing:
            return existing
        async with self._serialised("customer", account_id) as conn:
            row = await conn.fetchrow("SELECT email, stripe_customer_id FROM accounts WHERE id = $1", account_id)
            if row is None:
                raise BillingError("not_found", f"no account {account_id}")
            if row["stripe_customer_id"]:
                return row["stripe_customer_id"]
            # The key is the account's own, so a crash before the update below and a retry
            # (within Stripe's 24 hours) get the same Customer back, not a second one. Stripe
            # replays a key's customer even once it is deleted: a key naming that one asks for
            # the next (as sessions do, _open_session).
            params = {"email": row["email"], "metadata": {"codeplan_account_id": str(account_id),
                                                          "codeplan_installation": self._installation}}
            key = idempotency_key(self._installation, "customer", account_id)
            for _ in range(5):
                customer, replayed = await self._api.create_customer(params, key)
                if not replayed or not await self._api.customer_gone(customer.id):
                    break
                key = f"{key}-after-{customer.id}"[-255:]
            else:
                raise BillingError("unavailable", "Stripe kept returning deleted Customers")
            # a webhook may have linked it meanwhile (apply.py): the same Customer either way
            stored = await conn.fetchval(
                "UPDATE accounts SET stripe_customer_id = coalesce(stripe_customer_id, $2) WHERE id = $1"
                " RETURNING stripe_customer_id", account_id, customer.id)
            return stored

    async def _stored_customer(self, account_id: int) -> str | None:
        """The account's stored Customer if Stripe still has it; a deleted one is cleared (where
        it is still the stored one: a webhook's customer.deleted does the same, apply.py)."""
        existing = await self._pool.fetchval("SELECT stripe_customer_id FROM accounts WHERE id = $1", account_id)
        if existing and await self._api.customer_gone(existing):
            await self._pool.execute("UPDATE accounts SET stripe_customer_id = NULL"
                                     " WHERE id = $1 AND stripe_customer_id = $2", account_id, existing)
            return None
        return existing

    async def _price(self, lookup_key: str) -> asyncpg.Record | None:
        return await self._pool.fetchrow(
            "SELECT stripe_price_id, unit_amount_decimal, currency, topup_tokens FROM stripe_prices"
            " WHERE lookup_key = $1 AND current", lookup_key)

    async def sold(self) -> list[SoldPrice]:
        rows = await self._pool.fetch(
            "SELECT plan_id, billing_interval, unit_amount_decimal, currency FROM stripe_prices"
            " WHERE kind = 'plan' AND current ORDER BY plan_id, billing_interval")
        return [SoldPrice(r["plan_id"], r["billing_interval"], int(r["unit_amount_decimal"]), r["currency"])
                for r in rows]

    async def checkout(self, account_id: int, plan_id: str, interval: str = "month") -> str:
        """A Checkout Session in subscription mode for `plan_id`, billed every `interval`.

        An account pays for one subscription: opening this session expires the account's other
        open subscription sessions (another plan, another tab), and one already paid on Stripe,
        whose webhook has not reached us yet, refuses it. A subscription paid twice all the same
        (a session opened before this rule) is cancelled and refunded (duplicates.py)."""
        if interval not in ("month", "year"):
            raise BillingError("invalid", f"interval is month or year, not {interval!r}")
        plan = await self._pool.fetchrow("SELECT id, retired_at FROM plans WHERE id = $1", plan_id)
        if plan is None or plan["retired_at"] is not None:
            names = ", ".join(r["id"] for r in await self._pool.fetch(
                "SELECT id FROM plans WHERE retired_at IS NULL ORDER BY window_tokens"))
            what = "unknown plan" if plan is None else "plan"
            why = "" if plan is None else " is retired and no longer sold"
            raise BillingError("invalid", f"{what} {plan_id!r}{why}; plans are: {names}")
        price = await self._price(f"codeplan_{plan_id}_{interval}")
        if price is None:
            raise BillingError("invalid", f"plan {plan_id!r} is not sold {'yearly' if interval == 'year' else 'monthly'}"
                               " (the operator runs `codeplan stripe sync` to put plans on sale)")
        await self._refuse_if_closed_or_suspended(account_id)
        await self._refuse_if_subscribed(account_id)
        customer = await self.customer(account_id)
        items: list[dict[str, Any]] = [{"price": price["stripe_price_id"], "quantity": 1}]
        if plan_id in self._config.overage_plans:
            overage = await self._price(f"codeplan_overage_{interval}")
            if overage is not None:
                items.append({"price": overage["stripe_price_id"]})
        meta = {"codeplan_account_id": str(account_id), "codeplan_plan": plan_id,
                "codeplan_installation": self._installation}
        params = {
            "mode": "subscription", "customer": customer, "client_reference_id": str(account_id),
            "line_items": items, "metadata": meta, "subscription_data": {"metadata": meta},
            "success_url": self.billing_url + "?checkout=success&session_id={CHECKOUT_SESSION_ID}",
            "cancel_url": self.billing_url + "?checkout=canceled",
        }
        # two tabs opening sessions at once would each expire the other's: one at a time
        async with self._serialised("checkout", account_id):
            session = await self._open_session(params, idempotency_key(self._installation, "checkout", account_id,
                                                                       params, _bucket(60)))
            await self._only_open_subscription_session(customer, session)
        return session.url or ""

    async def _refuse_if_subscribed(self, account_id: int) -> None:
        live = await self._pool.fetchval(
            "SELECT stripe_subscription_id FROM stripe_subscriptions WHERE account_id = $1 AND status = ANY($2)",
            account_id, list(LIVE_STATUSES))
        if live:
            raise BillingError("conflict", _SUBSCRIBED)

    async def _only_open_subscription_session(self, customer: str, session: wire.CheckoutSession) -> None:
        """Expire the customer's other open subscription sessions; then, with none left that could
        still be paid, make sure none was paid: Stripe's own list of the customer's subscriptions,
        not our mirror, which fills only once the webhook is applied. `session` is expired too
        when the account turns out to be subscribed."""
        for other in await self._api.open_checkout_sessions(customer):
            if other.id == session.id or other.mode != "subscription":
                continue
            try:
                await self._api.expire_checkout_session(other.id)
            except stripe.InvalidRequestError:
                # no longer open: paid (or expired) meanwhile; which one is Stripe's to say
                if (await self._api.checkout_session(other.id)).status == "complete":
                    await self._withdraw(session)
                    raise BillingError("conflict", _SUBSCRIBED) from None
        if any(s.status in LIVE_STATUSES for s in await self._api.subscriptions_of(customer)):
            await self._withdraw(session)
            raise BillingError("conflict", _SUBSCRIBED)

    async def _withdraw(self, session: wire.CheckoutSession) -> None:
        with contextlib.suppress(stripe.InvalidRequestError):  # paid or expired already
            await self._api.expire_checkout_session(session.id)

    async def portal(self, account_id: int) -> str:
        """A Customer Portal session: card, invoices, plan changes and cancellation on Stripe."""
        await self._refuse_if_closed_or_suspended(account_id, suspended=False)
        customer = await self._stored_customer(account_id)
        if customer is None:
            if not await self._pool.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id):
                raise BillingError("not_found", f"no account {account_id}")
            raise BillingError("conflict", "this account has no billing yet: subscribe to a plan first")
        params = {"customer": customer, "return_url": self.billing_url}
        session = await self._api.create_portal_session(
            params, idempotency_key(self._installation, "portal", account_id, params, _bucket(1)))
        return session.url

    def block(self, block_id: str | int) -> TopupBlock:
        for block in self._config.topup_blocks:
            if block.id == str(block_id):
                return block
        offered = ", ".join(b.id for b in self._config.topup_blocks) or "none"
        raise BillingError("invalid", f"no top-up block {block_id!r}; blocks (tokens) are: {offered}")

    async def _refuse_if_closed_or_suspended(self, account_id: int, *, suspended: bool = True) -> None:
        """A closed account never signs in or uses a key again: a plan, a block or a Portal session
        opened for it would charge for nothing (a key a bridge still holds, a page loaded before the
        close, may still ask). Every request of a suspended account is refused (the ledger's
        admission): taking its money for a plan or a block it cannot use would be a refund to make
        (the portal stays open to it, `suspended=False`: to cancel, to see invoices). What is paid
        all the same, through a Checkout opened before the close, is undone (duplicates.py)."""
        row = await self._pool.fetchrow("SELECT closed_at IS NOT NULL AS closed, suspended_at IS NOT NULL AS suspended"
                                        " FROM accounts WHERE id = $1", account_id)
        if row is not None and row["closed"]:
            raise BillingError("closed", "This account is closed; it cannot buy a plan or a top-up, or open the "
                                         "billing portal.")
        if suspended and row is not None and row["suspended"]:
            raise BillingError("suspended", "This account is suspended by the operator; it cannot buy a plan "
                                            "or a top-up.")

    async def topup(self, account_id: int, block_id: str | int) -> str:
        """A Checkout Session in payment mode for one block of tokens."""
        block = self.block(block_id)
        price = await self._price(f"codeplan_topup_{block.tokens}")
        if price is None:
            raise BillingError("invalid", f"top-up {block.id} is not on sale yet (the operator runs "
                               "`codeplan stripe sync`)")
        await self._refuse_if_closed_or_suspended(account_id)
        if not await self._pool.fetchval(
                "SELECT 1 FROM subscriptions WHERE account_id = $1 AND status <> 'canceled'", account_id):
            raise BillingError("conflict", "a top-up extends a plan: subscribe to a plan first")
        customer = await self.customer(account_id)
        meta = {"codeplan_account_id": str(account_id), "codeplan_topup_tokens": str(block.tokens),
                "codeplan_installation": self._installation}
        params = {
            "mode": "payment", "customer": customer, "client_reference_id": str(account_id),
            "line_items": [{"price": price["stripe_price_id"], "quantity": 1}], "metadata": meta,
            "payment_intent_data": {"metadata": meta},
            "success_url": self.billing_url + "?checkout=success&session_id={CHECKOUT_SESSION_ID}",
            "cancel_url": self.billing_url + "?checkout=canceled",
        }
        session = await self._open_session(params, idempotency_key(self._installation, "topup", account_id,
                                                                   params, _bucket(60)))
        return session.url or ""

    async def _open_session(self, params: dict[str, Any], key: str) -> wire.CheckoutSession:
        """A Checkout Session still open for payment. The key gives a double click the session of
        the first click; if that one was paid (or expired) meanwhile, Stripe's replay of it is no
        use, and a key naming it asks for the next."""
        for _ in range(5):
            session, replayed = await self._api.create_checkout_session(params, key)
            if replayed:  # the replay is the session as it was then: read it as it is now
                session = await self._api.checkout_session(session.id)
            if session.status in (None, "open"):
                if not session.url:
                    raise BillingError("unavailable", "Stripe returned a Checkout Session without a URL")
                return session
            key = f"{key}-after-{session.id}"[-255:]
        raise BillingError("unavailable", "Stripe kept returning Checkout Sessions that are no longer open")
