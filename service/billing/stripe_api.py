"""Codeplan's calls to Stripe, through the official `stripe` library (async, over aiohttp).

The API version is pinned to the one the installed library was generated for: every request
carries `Stripe-Version`, so a change of the account's default version cannot change the shapes
we read. Responses are decoded from their raw JSON into the Structs of wire.py.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import msgspec

from . import stripe, wire  # stripe: loaded on first use (service/billing/__init__.py)

# Bump together with the `stripe` library, after reading the changelog (a test holds them equal).
STRIPE_API_VERSION = "2026-10-28.endive"

T = TypeVar("T")
_event = msgspec.json.Decoder(wire.Event)


def idempotency_key(installation: str, purpose: str, *parts: object) -> str:
    """A key that names what it creates: the same purpose and parameters give the same key, so a
    retry (by the library, or by us after a crash) returns the first answer; other parameters
    give another key, never an `idempotency_error`."""
    digest = hashlib.sha256(msgspec.json.encode([str(p) for p in parts])).hexdigest()[:32]
    return f"codeplan-{installation}-{purpose}-{digest}"


def describe(exc: stripe.StripeError) -> str:
    """An error as it may be logged or stored: Stripe's own message never carries a full key."""
    status = exc.http_status or "-"
    code = f" {exc.code}" if exc.code else ""
    return f"{type(exc).__name__} {status}{code}: {(exc.user_message or '')[:300]}"


def retryable(exc: stripe.StripeError) -> bool:
    """Whether the same request may succeed later: rate limits, network errors, Stripe's own 5xx
    and lock conflicts (409)."""
    if isinstance(exc, (stripe.RateLimitError, stripe.APIConnectionError)):
        return True
    if exc.http_status is not None and (exc.http_status >= 500 or exc.http_status in (409, 429)):
        return True
    return exc.headers.get("stripe-should-retry") == "true" if exc.headers else False


def retry_delay(base: float, attempts: int, cap: float) -> float:
    """Seconds until the next attempt of a queued billing task: doubling from `base` with each
    attempt, at most `cap`, jittered by a quarter either way so retries do not march together."""
    return min(base * 2 ** attempts, cap) * random.uniform(0.75, 1.25)


def is_duplicate_meter_event(exc: stripe.StripeError) -> bool:
    """Stripe refuses a meter event whose identifier it already holds (400, should not retry):
    for us that proves the event was recorded."""
    return (isinstance(exc, stripe.InvalidRequestError) and exc.http_status == 400
            and "already exists with identifier" in (exc.user_message or ""))


class StripeAPI:
    def __init__(self, secret_key: str, api_base: str, *, retries: int = 2, timeout: float = 30.0) -> None:
        self._http = stripe.AIOHTTPClient(timeout=timeout)
        self._client = stripe.StripeClient(
            secret_key, stripe_version=STRIPE_API_VERSION, base_addresses={"api": api_base},
            http_client=self._http, max_network_retries=retries)

    async def close(self) -> None:
        await self._http.close_async()

    @staticmethod
    async def _decode(call: Awaitable[Any], type_: type[T]) -> T:
        obj = await call
        return msgspec.json.decode(obj.last_response.body, type=type_)

    async def _pages(self, page: Callable[[dict[str, str]], Awaitable[Any]], type_: type[T],
                     ident: Callable[[T], str] = lambda item: getattr(item, "id")) -> AsyncIterator[list[T]]:
        """A list endpoint's objects, a page at a time (`ident` names an object for the next page)."""
        after: dict[str, str] = {}
        while True:
            batch = await self._decode(page(after), wire.Page[type_])  # type: ignore[valid-type]
            if batch.data:
                yield batch.data
            if not batch.has_more or not batch.data:
                return
            after = {"starting_after": ident(batch.data[-1])}

    async def _all(self, page: Callable[[dict[str, str]], Awaitable[Any]], type_: type[T]) -> list[T]:
        """Every object of a list endpoint, page after page."""
        return [item async for batch in self._pages(page, type_) for item in batch]

    @staticmethod
    def _options(key: str | None) -> dict[str, Any]:
        return {"idempotency_key": key} if key else {}

    # ---- customers and sessions --------------------------------------------------------

    async def create_customer(self, params: dict[str, Any], key: str) -> tuple[wire.Customer, bool]:
        """The customer, and whether it is Stripe's replay of an earlier answer to this key (the
        customer as it was then: it may have been deleted since)."""
        obj = await self._client.v1.customers.create_async(params, self._options(key))
        replayed = obj.last_response.headers.get("Idempotent-Replayed") == "true"
        return msgspec.json.decode(obj.last_response.body, type=wire.Customer), replayed

    async def customer(self, ident: str) -> wire.Customer:
        """The customer as Stripe holds it now (`deleted` once deleted)."""
        return await self._decode(self._client.v1.customers.retrieve_async(ident), wire.Customer)

    async def customer_gone(self, ident: str) -> bool:
        """Whether Stripe no longer has customer `ident`: deleted (Stripe still answers it, marked
        deleted) or unknown to this Stripe account (resource_missing)."""
        try:
            return (await self.customer(ident)).deleted
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404 and exc.code == "resource_missing":
                return True
            raise

    async def create_checkout_session(self, params: dict[str, Any], key: str) -> tuple[wire.CheckoutSession, bool]:
        """The session, and whether it is Stripe's replay of an earlier answer to this key (a
        snapshot of the session as it was then)."""
        obj = await self._client.v1.checkout.sessions.create_async(params, self._options(key))
        replayed = obj.last_response.headers.get("Idempotent-Replayed") == "true"
        return msgspec.json.decode(obj.last_response.body, type=wire.CheckoutSession), replayed

    async def checkout_session(self, ident: str) -> wire.CheckoutSession:
        return await self._decode(self._client.v1.checkout.sessions.retrieve_async(ident), wire.CheckoutSession)

    async def open_checkout_sessions(self, customer: str) -> list[wire.CheckoutSession]:
        """Every Checkout Session of `customer` still open for payment."""
        return await self._all(lambda after: self._client.v1.checkout.sessions.list_async(
            {"customer": customer, "status": "open", "limit": 100, **after}), wire.CheckoutSession)

    async def expire_checkout_session(self, ident: str) -> wire.CheckoutSession:
        return await self._decode(self._client.v1.checkout.sessions.expire_async(ident), wire.CheckoutSession)

    async def create_portal_session(self, params: dict[str, Any], key: str) -> wire.PortalSession:
        return await self._decode(self._client.v1.billing_portal.sessions.create_async(params, self._options(key)),
                                  wire.PortalSession)

    # ---- what webhooks name, read again ----------------------------------------------------

    async def subscription(self, ident: str) -> wire.Subscription:
        return await self._decode(self._client.v1.subscriptions.retrieve_async(ident), wire.Subscription)

    async def subscriptions_of(self, customer: str) -> list[wire.Subscription]:
        """Every subscription of `customer`, ended ones included."""
        return await self._all(lambda after: self._client.v1.subscriptions.list_async(
            {"customer": customer, "status": "all", "limit": 100, **after}), wire.Subscription)

    async def invoice(self, ident: str) -> wire.Invoice:
        return await self._decode(self._client.v1.invoices.retrieve_async(ident), wire.Invoice)

    async def invoice_lines(self, ident: str) -> list[wire.InvoiceLine]:
        """Every line of invoice `ident` (an invoice carries only the first few of them)."""
        return await self._all(lambda after: self._client.v1.invoices.line_items.list_async(
            ident, {"limit": 100, **after}), wire.InvoiceLine)

    async def charge(self, ident: str) -> wire.Charge:
        return await self._decode(self._client.v1.charges.retrieve_async(ident), wire.Charge)

    async def disputes_of(self, payment_intent: str) -> list[wire.Dispute]:
        return await self._all(lambda after: self._client.v1.disputes.list_async(
            {"payment_intent": payment_intent, "limit": 100, **after}), wire.Dispute)

    async def event_pages(self, created: int) -> AsyncIterator[list[tuple[wire.Event, bytes]]]:
        """The events Stripe lists created at `created` (epoch seconds) or later, a page at a time,
        each with its JSON as Stripe sent it (what a webhook would have carried)."""
        async for batch in self._pages(
                lambda after: self._client.v1.events.list_async({"created": {"gte": created}, "limit": 100, **after}),
                msgspec.Raw, ident=lambda raw: _event.decode(raw).id):
            yield [(_event.decode(raw), bytes(raw)) for raw in batch]

    async def payment_intent(self, ident: str) -> wire.PaymentIntent:
        return await self._decode(self._client.v1.payment_intents.retrieve_async(ident), wire.PaymentIntent)

    async def invoices_of(self, subscription: str) -> list[wire.Invoice]:
        return await self._all(lambda after: self._client.v1.invoices.list_async(
            {"subscription": subscription, "limit": 100, **after}), wire.Invoice)

    async def invoice_payments(self, invoice: str) -> list[wire.InvoicePayment]:
        return await self._all(lambda after: self._client.v1.invoice_payments.list_async(
            {"invoice": invoice, "limit": 100, **after}), wire.InvoicePayment)

    # ---- undoing a subscription bought twice -----------------------------------------------

    async def cancel_subscription(self, ident: str, params: dict[str, Any], key: str) -> wire.Subscription:
        return await self._decode(self._client.v1.subscriptions.cancel_async(ident, params, self._options(key)),
                                  wire.Subscription)

    async def void_invoice(self, ident: str, key: str) -> wire.Invoice:
        return await self._decode(self._client.v1.invoices.void_invoice_async(ident, None, self._options(key)),
                                  wire.Invoice)

    async def create_refund(self, params: dict[str, Any], key: str) -> wire.Refund:
        return await self._decode(self._client.v1.refunds.create_async(params, self._options(key)), wire.Refund)

    async def price(self, ident: str) -> wire.Price:
        return await self._decode(self._client.v1.prices.retrieve_async(ident), wire.Price)

    # ---- the catalogue -----------------------------------------------------------------

    async def product(self, ident: str) -> wire.Product | None:
        try:
            return await self._decode(self._client.v1.products.retrieve_async(ident), wire.Product)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return None
            raise

    async def create_product(self, params: dict[str, Any], key: str) -> wire.Product:
        return await self._decode(self._client.v1.products.create_async(params, self._options(key)), wire.Product)

    async def update_product(self, ident: str, params: dict[str, Any]) -> wire.Product:
        return await self._decode(self._client.v1.products.update_async(ident, params), wire.Product)

    async def prices_by_lookup_key(self, lookup_key: str) -> list[wire.Price]:
        return (await self._decode(self._client.v1.prices.list_async({"lookup_keys": [lookup_key], "limit": 10}),
                                   wire.Page[wire.Price])).data

    async def create_price(self, params: dict[str, Any], key: str) -> wire.Price:
        return await self._decode(self._client.v1.prices.create_async(params, self._options(key)), wire.Price)

    async def update_price(self, ident: str, params: dict[str, Any]) -> wire.Price:
        return await self._decode(self._client.v1.prices.update_async(ident, params), wire.Price)

    async def meters(self) -> list[wire.Meter]:
        return (await self._decode(self._client.v1.billing.meters.list_async({"limit": 100}),
                                   wire.Page[wire.Meter])).data

    async def create_meter(self, params: dict[str, Any], key: str) -> wire.Meter:
        return await self._decode(self._client.v1.billing.meters.create_async(params, self._options(key)),
                                  wire.Meter)

    # ---- usage ---------------------------------------------------------------------------

    async def create_meter_event(self, params: dict[str, Any], key: str) -> wire.MeterEvent:
        return await self._decode(self._client.v1.billing.meter_events.create_async(params, self._options(key)),
                                  wire.MeterEvent)
