"""`Billing`: what the rest of Codeplan uses (`app.state.billing`; None when billing is off).

    await billing.checkout(account_id, "pro")      -> Stripe Checkout URL (subscription)
    await billing.portal(account_id)               -> Customer Portal URL
    await billing.topup(account_id, "20000000")    -> Stripe Checkout URL (one block of tokens)
    billing.topup_blocks                           -> the blocks on sale
    await billing.state(account_id)                -> BillingState
"""
from __future__ import annotations

import asyncpg

from ..config import Config
from .apply import EventApplier
from .catalog import Catalog, Line
from .catchup import Catchup
from .duplicates import Duplicates
from .ended import EndedInvoices
from .prorations import StaleProrations
from .outbox import Outbox
from .sessions import Sessions
from .state import BillingState, BlockView, account_state
from .stripe_api import StripeAPI
from .worker import BillingWorker


async def installation_id(pool: asyncpg.Pool) -> str:
    return await pool.fetchval("SELECT id::text FROM billing_installation")


async def set_overage(pool: asyncpg.Pool, *, plans: tuple[str, ...], cap: int) -> None:
    """Which plans may go beyond their windows, and how far, as admission reads it (plans table)."""
    await pool.execute(
        "UPDATE plans SET overage_cap_tokens = CASE WHEN id = ANY($1::text[]) AND $2::bigint > 0 THEN $2::bigint END"
        " WHERE overage_cap_tokens IS DISTINCT FROM"
        " (CASE WHEN id = ANY($1::text[]) AND $2::bigint > 0 THEN $2::bigint END)",
        list(plans), cap)


class Billing:
    def __init__(self, pool: asyncpg.Pool, config: Config, api: StripeAPI, installation: str, *,
                 retry_base: float = 2.0, poll: float = 1.0) -> None:
        self.config = config
        self._pool = pool
        self.api = api
        self.installation = installation
        self.sessions = Sessions(pool, api, config, installation)
        self.applier = EventApplier(pool, api, config, retry_base, installation)
        self.outbox = Outbox(pool, api, retry_base)
        self.duplicates = Duplicates(pool, api, installation, retry_base)
        self.ended = EndedInvoices(pool, api, installation, retry_base)
        self.stale_prorations = StaleProrations(pool, api, installation, retry_base)
        self.worker = BillingWorker(pool, self.applier, self.outbox, self.duplicates, Catchup(pool, api), self.ended,
                                    self.stale_prorations, poll=poll, catchup_every=config.stripe_catchup_seconds)

    @classmethod
    async def open(cls, pool: asyncpg.Pool, config: Config, *, retry_base: float = 2.0,
                   poll: float = 1.0) -> "Billing":
        # overage needs a price to bill it at
        await set_overage(pool, plans=config.overage_plans,
                          cap=config.overage_cap_tokens if config.overage_cents_per_million > 0 else 0)
        api = StripeAPI(config.stripe_secret_key, config.stripe_api_base)
        return cls(pool, config, api, await installation_id(pool), retry_base=retry_base, poll=poll)

    async def close(self) -> None:
        await self.worker.stop()
        await self.api.close()

    def start(self) -> None:
        self.worker.start()

    def wake(self) -> None:
        self.worker.wake()

    async def checkout(self, account_id: int, plan_id: str, interval: str = "month") -> str:
        return await self.sessions.checkout(account_id, plan_id, interval)

    async def portal(self, account_id: int) -> str:
        return await self.sessions.portal(account_id)

    async def topup(self, account_id: int, block: str | int) -> str:
        return await self.sessions.topup(account_id, block)

    @property
    def topup_blocks(self) -> list[BlockView]:
        """The blocks on sale (`id` is what topup() takes; `label` names it for a page)."""
        return blocks_of(self.config)

    async def state(self, account_id: int) -> BillingState:
        return await state_of(self._pool, self.config, account_id)

    async def sync_catalog(self) -> list[Line]:
        return await Catalog(self._pool, self.api, self.config, self.installation).sync()


def blocks_of(config: Config) -> list[BlockView]:
    return [BlockView(id=b.id, tokens=b.tokens, amount=b.price, currency=config.stripe_currency,
                      valid_days=config.topup_valid_days) for b in config.topup_blocks]


async def state_of(pool: asyncpg.Pool, config: Config, account_id: int) -> BillingState:
    return await account_state(pool, account_id, enabled=config.billing_enabled, blocks=blocks_of(config))
