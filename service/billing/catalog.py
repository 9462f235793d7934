"""`codeplan stripe sync`: the plans table, as Products and Prices on Stripe, and the overage meter.

Idempotent: a second run changes nothing. Products have our own ids (`codeplan_pro`); prices are
found by lookup key (`codeplan_pro_month`). A price whose amount or terms changed cannot be edited
on Stripe, so a new one takes over the lookup key and the old one is archived (subscriptions on it
keep it until they change plan). Every price made here is recorded in `stripe_prices`.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
import msgspec

from ..config import Config
from . import wire
from .stripe_api import StripeAPI, idempotency_key

METER_EVENT_NAME = "codeplan_overage_tokens"


class CatalogError(Exception):
    """The configuration names something the plans table does not have."""


class Line(msgspec.Struct, frozen=True):
    what: str  # product codeplan_pro | price codeplan_pro_month | meter codeplan_overage_tokens
    stripe_id: str
    action: str  # created | updated | unchanged | replaced | archived


class Wanted(msgspec.Struct, frozen=True):
    lookup_key: str
    kind: str  # plan | overage | topup
    product: str
    unit_amount: int | None
    unit_amount_decimal: Decimal | None
    interval: str | None
    metered: bool = False
    plan_id: str | None = None
    topup_tokens: int | None = None


def _decimal(value: Decimal) -> str:
    """Stripe takes at most 12 decimal places in unit_amount_decimal."""
    text = format(value.quantize(Decimal("1e-12")).normalize(), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".")


class Catalog:
    def __init__(self, pool: asyncpg.Pool, api: StripeAPI, config: Config, installation: str) -> None:
        self._pool = pool
        self._api = api
        self._config = config
        self._installation = installation
        self.lines: list[Line] = []

    async def sync(self) -> list[Line]:
        config = self._config
        everything = await self._pool.fetch(
            "SELECT id, name, window_tokens, weekly_tokens, monthly_price_cents, models, retired_at"
            " FROM plans ORDER BY window_tokens")
        known = {p["id"] for p in everything}
        # a retired plan takes no new subscriptions: its prices are archived (Checkout and the
        # Portal stop offering them); subscriptions on it keep it, their price still maps to it
        for plan in everything:
            if plan["retired_at"] is not None:
                for interval in ("month", "year"):
                    await self._archive(f"codeplan_{plan['id']}_{interval}")
        plans = [p for p in everything if p["retired_at"] is None]
        for name in [p.plan for p in config.plan_prices] + list(config.overage_plans):
            if name not in known:
                raise CatalogError(f"plan {name!r} is configured but not in the plans table "
                                   f"(plans: {', '.join(sorted(known))})")
        prices = {p.plan: p for p in config.plan_prices}
        wanted: list[Wanted] = []
        for plan in plans:
            configured = prices.get(plan["id"])
            monthly = configured.monthly if configured else plan["monthly_price_cents"]
            if configured and configured.monthly != plan["monthly_price_cents"]:
                await self._pool.execute("UPDATE plans SET monthly_price_cents = $2 WHERE id = $1",
                                         plan["id"], configured.monthly)
            product = await self._product(f"codeplan_{plan['id']}", plan["name"], {
                "codeplan_plan": plan["id"], "window_tokens": str(plan["window_tokens"]),
                "weekly_tokens": str(plan["weekly_tokens"])},
                f"{plan['window_tokens']:,} tokens per 5 hours, {plan['weekly_tokens']:,} per week")
            wanted.append(Wanted(f"codeplan_{plan['id']}_month", "plan", product, monthly, None, "month",
                                 plan_id=plan["id"]))
            if configured and configured.yearly is not None:
                wanted.append(Wanted(f"codeplan_{plan['id']}_year", "plan", product, configured.yearly, None,
                                     "year", plan_id=plan["id"]))

        meter = await self._meter()
        if config.overage_plans and config.overage_cents_per_million > 0:
            product = await self._product("codeplan_overage", "GLM tokens beyond the plan",
                                          {"codeplan_kind": "overage"}, "Billed per token, per billing period")
            per_token = config.overage_cents_per_million / Decimal(1_000_000)
            for interval in sorted({w.interval for w in wanted if w.kind == "plan"}):
                wanted.append(Wanted(f"codeplan_overage_{interval}", "overage", product, None, per_token,
                                     interval, metered=True))
        if config.topup_blocks:
            product = await self._product("codeplan_topup", "GLM token top-up", {"codeplan_kind": "topup"},
                                          f"Spent after a window is exhausted; valid {config.topup_valid_days} days")
            for block in config.topup_blocks:
                wanted.append(Wanted(f"codeplan_topup_{block.tokens}", "topup", product, block.price, None, None,
                                     topup_tokens=block.tokens))
        for want in wanted:
            await self._price(want, meter)
        return self.lines

    async def _product(self, ident: str, name: str, meta: dict[str, str], description: str) -> str:
        found = await self._api.product(ident)
        if found is None:
            params = {"id": ident, "name": name, "metadata": meta, "description": description}
            created = await self._api.create_product(
                params, idempotency_key(self._installation, "product", ident, params))
            self.lines.append(Line(f"product {ident}", created.id, "created"))
            return created.id
        if (found.name, found.metadata, found.description, found.active) != (name, {**found.metadata, **meta},
                                                                              description, True):
            await self._api.update_product(ident, {"name": name, "metadata": meta, "description": description,
                                                   "active": True})
            self.lines.append(Line(f"product {ident}", ident, "updated"))
        else:
            self.lines.append(Line(f"product {ident}", ident, "unchanged"))
        return ident

    async def _meter(self) -> str:
        ours = [m for m in await self._api.meters() if m.event_name == METER_EVENT_NAME]
        active = [m for m in ours if m.status == "active"]
        if active:
            meter, action = active[0], "unchanged"
        else:
            params = {"display_name": "Codeplan overage tokens", "event_name": METER_EVENT_NAME,
                      "default_aggregation": {"formula": "sum"},
                      "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                      "value_settings": {"event_payload_key": "value"}}
            meter = await self._api.create_meter(params, idempotency_key(
                self._installation, "meter", params, sorted(m.id for m in ours)))
            action = "created"
        await self._pool.execute(
            "INSERT INTO stripe_meters (event_name, stripe_meter_id) VALUES ($1, $2)"
            " ON CONFLICT (event_name) DO UPDATE SET stripe_meter_id = excluded.stripe_meter_id, synced_at = now()",
            METER_EVENT_NAME, meter.id)
        self.lines.append(Line(f"meter {METER_EVENT_NAME}", meter.id, action))
        return meter.id

    def _matches(self, price: wire.Price, want: Wanted, meter: str) -> bool:
        if not price.active or price.product != want.product or price.currency != self._config.stripe_currency:
            return False
        if want.unit_amount is not None and price.unit_amount != want.unit_amount:
            return False
        if want.unit_amount_decimal is not None and (
                price.unit_amount_decimal is None or Decimal(price.unit_amount_decimal) != Decimal(
                    _decimal(want.unit_amount_decimal))):
            return False
        recurring = price.recurring
        if want.interval is None:
            return recurring is None
        return (recurring is not None and recurring.interval == want.interval and recurring.interval_count == 1
                and recurring.usage_type == ("metered" if want.metered else "licensed")
                and (recurring.meter == meter if want.metered else True))

    async def _archive(self, lookup_key: str) -> None:
        prices = await self._api.prices_by_lookup_key(lookup_key)
        for price in prices:
            if price.active:
                await self._api.update_price(price.id, {"active": False})
            self.lines.append(Line(f"price {lookup_key}", price.id, "archived" if price.active else "unchanged"))
        await self._pool.execute("UPDATE stripe_prices SET current = false WHERE lookup_key = $1 AND current",
                                 lookup_key)

    async def _price(self, want: Wanted, meter: str) -> None:
        meta = {"codeplan_kind": want.kind}
        if want.plan_id:
            meta["codeplan_plan"] = want.plan_id
        if want.topup_tokens:
            meta["codeplan_topup_tokens"] = str(want.topup_tokens)
        existing = [p for p in await self._api.prices_by_lookup_key(want.lookup_key)]
        current = next((p for p in existing if self._matches(p, want, meter)), None)
        if current is not None:
            action = "unchanged"
            if any(current.metadata.get(k) != v for k, v in meta.items()):
                current = await self._api.update_price(current.id, {"metadata": meta})
                action = "updated"
        else:
            params: dict[str, Any] = {"product": want.product, "currency": self._config.stripe_currency,
                                      "lookup_key": want.lookup_key, "transfer_lookup_key": True,
                                      "metadata": meta, "nickname": want.lookup_key}
            if want.unit_amount is not None:
                params["unit_amount"] = want.unit_amount
            else:
                params["unit_amount_decimal"] = _decimal(want.unit_amount_decimal or Decimal(0))
            if want.interval:
                params["recurring"] = {"interval": want.interval, "interval_count": 1}
                if want.metered:
                    params["recurring"].update(usage_type="metered", meter=meter)
            # The key names what this price replaces: a retry of this very step gets the same price
            # back, while going back to earlier terms later makes a new price rather than replaying
            # (within Stripe's 24 hours) the creation of the one since archived.
            current = await self._api.create_price(params, idempotency_key(
                self._installation, "price", params, sorted(p.id for p in existing)))
            action = "replaced" if existing else "created"
            for old in existing:
                if old.id != current.id and old.active:
                    await self._api.update_price(old.id, {"active": False})
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE stripe_prices SET current = false WHERE lookup_key = $1 AND stripe_price_id <> $2",
                               want.lookup_key, current.id)
            await conn.execute(
                "INSERT INTO stripe_prices (stripe_price_id, lookup_key, kind, plan_id, billing_interval, topup_tokens,"
                " stripe_product_id, unit_amount_decimal, currency, current)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, true)"
                " ON CONFLICT (stripe_price_id) DO UPDATE SET current = true, synced_at = now()",
                current.id, want.lookup_key, want.kind, want.plan_id, want.interval, want.topup_tokens,
                want.product, Decimal(current.unit_amount_decimal or current.unit_amount or 0), current.currency)
        self.lines.append(Line(f"price {want.lookup_key}", current.id, action))
