"""HTTP adapters for billing: Stripe's webhook, and JSON endpoints authenticated by an API key
(the web pages call the same functions from their own session-authenticated routes)."""
from __future__ import annotations

import logging
from typing import Literal

import msgspec
import stripe
from litestar import Request, Response, get, post

from bridge.app import api_key

from ..problems import problem
from .engine import Billing, state_of
from .sessions import BillingError
from .stripe_api import describe
from .webhooks import WebhookRejected, record, verify

log = logging.getLogger("codeplan.billing")


def _problem(status: int, title: str, detail: str | None = None) -> Response:
    return problem(status, title, detail)


class CheckoutRequest(msgspec.Struct, forbid_unknown_fields=True):
    plan: str
    interval: Literal["month", "year"] = "month"


class TopupRequest(msgspec.Struct, forbid_unknown_fields=True):
    block: str | int


class SessionURL(msgspec.Struct):
    url: str


class Received(msgspec.Struct):
    received: bool = True
    duplicate: bool = False


@post("/stripe/webhook", status_code=200)
async def stripe_webhook(request: Request) -> Response:
    """Verify, record, answer. The effects follow from the queue (worker.py)."""
    config = request.app.state.config
    if not config.stripe_webhook_secrets:
        return _problem(503, "Stripe webhooks are not configured",
                        "Set STRIPE_WEBHOOK_SECRET to the endpoint's signing secret.")
    payload = await request.body()
    try:
        event = verify(payload, request.headers.get("stripe-signature"), config.stripe_webhook_secrets)
    except WebhookRejected as rejected:
        log.warning("stripe webhook rejected", extra={"why": rejected.reason})
        return _problem(400, "Invalid Stripe webhook", rejected.reason)
    new = await record(request.app.state.pool, event, payload)
    billing: Billing | None = request.app.state.billing
    if new and billing is not None:
        billing.wake()
    return Response(msgspec.json.encode(Received(duplicate=not new)), media_type="application/json")


async def _account(request: Request) -> int | None:
    """The key's account, through the authenticator and its failed-authentication throttle
    (an address trying many keys gets 429s, not a database query each)."""
    key = api_key(request)
    if not key:
        return None
    client = request.client.host if request.client else None
    principal = await request.app.state.auth.authenticate(key, client=client)
    return None if principal is None else principal.account_id


_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "unavailable": 502}


async def _session(request: Request, make) -> Response:
    account = await _account(request)
    if account is None:
        return _problem(401, "Invalid API key", "Send your Codeplan key as `Authorization: Bearer <key>`.")
    billing: Billing | None = request.app.state.billing
    if billing is None:
        return _problem(503, "Billing is off", "This Codeplan has no Stripe account configured; plans are "
                        "assigned by its operator.")
    try:
        url = await make(billing, account)
    except msgspec.ValidationError as exc:
        return _problem(400, "Invalid request", str(exc))
    except BillingError as exc:
        return _problem(_STATUS.get(exc.kind, 400), "Billing request refused", exc.message)
    except stripe.StripeError as exc:
        log.error("stripe request failed", extra={"account": account, "error": describe(exc)})
        return _problem(502, "Stripe did not complete the request", "Try again in a moment.")
    return Response(msgspec.json.encode(SessionURL(url=url)), media_type="application/json")


def _body(raw: bytes, type_):
    return msgspec.json.decode(raw or b"{}", type=type_)


@post("/v1/billing/checkout", status_code=200)
async def checkout(request: Request) -> Response:
    raw = await request.body()

    async def make(billing: Billing, account: int) -> str:
        try:
            body = _body(raw, CheckoutRequest)
        except msgspec.DecodeError as exc:
            raise msgspec.ValidationError(str(exc)) from None
        return await billing.checkout(account, body.plan, body.interval)
    return await _session(request, make)


@post("/v1/billing/portal", status_code=200)
async def portal(request: Request) -> Response:
    return await _session(request, lambda billing, account: billing.portal(account))


@post("/v1/billing/topup", status_code=200)
async def topup(request: Request) -> Response:
    raw = await request.body()

    async def make(billing: Billing, account: int) -> str:
        try:
            body = _body(raw, TopupRequest)
        except msgspec.DecodeError as exc:
            raise msgspec.ValidationError(str(exc)) from None
        return await billing.topup(account, body.block)
    return await _session(request, make)


@get("/v1/billing")
async def billing_state(request: Request) -> Response:
    account = await _account(request)
    if account is None:
        return _problem(401, "Invalid API key", "Send your Codeplan key as `Authorization: Bearer <key>`.")
    state = await state_of(request.app.state.pool, request.app.state.config, account)
    return Response(msgspec.json.encode(state), media_type="application/json")


routes = [stripe_webhook, checkout, portal, topup, billing_state]
