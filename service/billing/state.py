"""An account's billing, as the API and the web page show it."""
from __future__ import annotations

import datetime as dt

import asyncpg
import msgspec

from bridge.journey import iso_utc


class SubscriptionState(msgspec.Struct):
    plan: str
    status: str  # Codeplan's: active | past_due | canceled
    # why requests are refused for a billing reason, null while the plan may be used
    refusal: str | None
    stripe_status: str | None = None  # null for a plan assigned by the operator
    current_period_end: str | None = None
    cancel_at_period_end: bool = False
    grace_until: str | None = None


class InvoiceView(msgspec.Struct):
    id: str
    status: str
    amount_due: int
    amount_paid: int
    currency: str
    created: str
    payment_problem: str | None = None
    hosted_invoice_url: str | None = None


class TopupView(msgspec.Struct):
    tokens: int
    used: int  # spent on what the plan's windows could not hold
    remaining: int
    revoked: int  # taken back by a refund or a dispute so far (the part held by requests in flight follows as they settle)
    amount: int
    currency: str
    amount_refunded: int
    amount_disputed: int  # withdrawn by an open or lost dispute (a chargeback)
    purchased_at: str
    expires_at: str


class OverageView(msgspec.Struct):
    cap: int
    used: int
    held: int
    period_start: str
    period_end: str


class PriceView(msgspec.Struct):
    plan: str
    interval: str
    amount: int
    currency: str


class BlockView(msgspec.Struct):
    id: str
    tokens: int
    amount: int
    currency: str
    valid_days: int

    @property
    def label(self) -> str:
        """How a page names it: "20,000,000 tokens, 10.00 USD"."""
        return f"{self.tokens:,} tokens, {self.amount / 100:.2f} {self.currency.upper()}"


class BillingState(msgspec.Struct):
    billing: bool  # false: billing is off, plans are assigned by the operator
    customer: bool
    subscription: SubscriptionState | None
    invoices: list[InvoiceView]
    topups: list[TopupView]
    overage: OverageView | None
    prices: list[PriceView]
    topup_blocks: list[BlockView]


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else iso_utc(value)


_SUBSCRIPTION_SQL = """
SELECT s.plan_id, s.status, subscription_refusal(s) AS refusal, m.status AS stripe_status,
       m.current_period_end, coalesce(m.cancel_at_period_end, false) AS cancel_at_period_end,
       -- no grace runs while only an upgrade's proration is unpaid, or nothing at all: the plan
       -- paid for is kept (0052, 0058)
       CASE WHEN m.status = 'past_due' AND billing_arrears(m.stripe_subscription_id)
            THEN m.grace_until END AS grace_until
  FROM subscriptions s LEFT JOIN stripe_subscriptions m ON m.subscription_id = s.id
 WHERE s.account_id = $1
 ORDER BY (s.status <> 'canceled') DESC, s.id DESC LIMIT 1
"""


async def account_state(pool: asyncpg.Pool, account_id: int, *, enabled: bool,
                        blocks: list[BlockView]) -> BillingState:
    async with pool.acquire() as conn:
        customer = await conn.fetchval("SELECT stripe_customer_id IS NOT NULL FROM accounts WHERE id = $1", account_id)
        sub = await conn.fetchrow(_SUBSCRIPTION_SQL, account_id)
        # an ended subscription's open invoice is voided by the worker (ended.py) and a payment
        # of it refunded, and so is an upgrade's proration invoice made in a period now over
        # (prorations.py): neither page to pay is offered meanwhile
        invoices = await conn.fetch(
            "SELECT i.*, coalesce(m.status IN ('canceled', 'incomplete_expired') AND i.created_at < m.ended_at"
            "                     OR i.billing_reason = 'subscription_update' AND i.prorations_only"
            "                        AND i.created_at < m.current_period_start, false) AS not_payable"
            " FROM billing_invoices i LEFT JOIN stripe_subscriptions m ON m.stripe_subscription_id = i.stripe_subscription_id"
            " WHERE i.account_id = $1 ORDER BY i.created_at DESC LIMIT 12", account_id)
        topups = await conn.fetch(
            "SELECT t.*, coalesce(q.posted, 0) AS used, t.tokens_revoked - coalesce(q.revoke_owed, 0) AS revoked,"
            " CASE WHEN q.id IS NULL THEN CASE WHEN t.expires_at <= now() THEN 0 ELSE t.tokens - t.tokens_revoked END"
            "      WHEN q.ends_at <= now() THEN 0 ELSE greatest(q.allowance - q.posted - q.held, 0) END AS remaining"
            " FROM topups t LEFT JOIN quota_windows q ON q.id = t.window_id"
            " WHERE t.account_id = $1 ORDER BY t.purchased_at DESC LIMIT 20", account_id)
        overage = await conn.fetchrow(
            "SELECT q.allowance, q.posted, q.held, q.starts_at, q.ends_at FROM quota_windows q"
            " JOIN subscriptions s ON s.id = q.subscription_id"
            " WHERE s.account_id = $1 AND s.status <> 'canceled' AND q.kind = 'overage'"
            "   AND q.starts_at <= now() AND q.ends_at > now()", account_id)
        prices = await conn.fetch(
            "SELECT plan_id, billing_interval, unit_amount_decimal, currency FROM stripe_prices"
            " WHERE kind = 'plan' AND current ORDER BY plan_id, billing_interval")
    return BillingState(
        billing=enabled, customer=bool(customer),
        subscription=None if sub is None else SubscriptionState(
            plan=sub["plan_id"], status=sub["status"], refusal=sub["refusal"], stripe_status=sub["stripe_status"],
            current_period_end=_iso(sub["current_period_end"]), cancel_at_period_end=sub["cancel_at_period_end"],
            grace_until=_iso(sub["grace_until"])),
        invoices=[InvoiceView(id=r["stripe_invoice_id"], status=r["status"], amount_due=r["amount_due"],
                              amount_paid=r["amount_paid"], currency=r["currency"], created=iso_utc(r["created_at"]),
                              payment_problem=r["payment_problem"],
                              hosted_invoice_url=None if r["status"] in ("open", "uncollectible") and r["not_payable"]
                              else r["hosted_invoice_url"])
                  for r in invoices],
        topups=[TopupView(tokens=r["tokens"], used=r["used"], remaining=r["remaining"], revoked=r["revoked"],
                          amount=r["amount"], currency=r["currency"], amount_refunded=r["amount_refunded"],
                          amount_disputed=r["amount_disputed"],
                          purchased_at=iso_utc(r["purchased_at"]), expires_at=iso_utc(r["expires_at"]))
                for r in topups],
        overage=None if overage is None else OverageView(
            cap=overage["allowance"], used=overage["posted"], held=overage["held"],
            period_start=iso_utc(overage["starts_at"]), period_end=iso_utc(overage["ends_at"])),
        prices=[PriceView(plan=r["plan_id"], interval=r["billing_interval"], amount=int(r["unit_amount_decimal"]),
                          currency=r["currency"]) for r in prices] if enabled else [],
        topup_blocks=blocks if enabled else [])
