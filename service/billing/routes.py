"""HTTP adapters for billing: Stripe's webhook, and JSON endpoints authenticated by an API key
(the web pages call the same functions from their own session-authenticated routes).

The JSON endpoints are part of the service's OpenAPI schema (service/openapi.py); the webhook
speaks Stripe's protocol and is not. Keys are looked up by the application's authenticator,
behind the failed-authentication throttle like every key."""
from __future__ import annotations

import logging
from typing import Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import JSONBody

from bridge.app import api_key

from ..problems import MEDIA_TYPE, Problem, problem, problem_responses
from ..strict_input import strict_input
from ..throttle import GuardedAuthenticator
from . import stripe  # Stripe's library, loaded on first use (service/billing/__init__.py)
from .engine import Billing, state_of
from .state import BillingState
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


# Stripe's events are a few KB (an object and what changed in it; its lists come a page at a
# time): a body past this is not one of theirs. The route's own limit, far below the API's
# CODEPLAN_MAX_BODY_BYTES: a stranger's post may make the server read and HMAC this much, no more.
WEBHOOK_MAX_BYTES = 1024 * 1024


@post("/stripe/webhook", status_code=200, include_in_schema=False, request_max_body_size=WEBHOOK_MAX_BYTES)
async def stripe_webhook(request: Request) -> Response:
    """Verify, record, answer. The effects follow from the queue (worker.py). A post without
    Stripe's signature header is refused before its body is read; a body over WEBHOOK_MAX_BYTES
    gets a 413, from its Content-Length before a byte is read, else once it passes the limit."""
    config = request.app.state.config
    if not config.stripe_webhook_secrets:
        return _problem(503, "Stripe webhooks are not configured",
                        "Set STRIPE_WEBHOOK_SECRET to the endpoint's signing secret.")
    signature = request.headers.get("stripe-signature")
    if not signature:
        log.warning("stripe webhook rejected", extra={"why": "no Stripe-Signature header"})
        return _problem(400, "Invalid Stripe webhook", "no Stripe-Signature header")
    payload = await request.body()  # RequestEntityTooLarge (413) past WEBHOOK_MAX_BYTES
    try:
        event = verify(payload, signature, config.stripe_webhook_secrets)
    except WebhookRejected as rejected:
        log.warning("stripe webhook rejected", extra={"why": rejected.reason})
        return _problem(400, "Invalid Stripe webhook", rejected.reason)
    new = await record(request.app.state.pool, event, payload)
    billing: Billing | None = request.app.state.billing
    if new and billing is not None:
        billing.wake()
    return Response(msgspec.json.encode(Received(duplicate=not new)), media_type="application/json")


async def key_holder(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard of the JSON endpoints: the key's account in `connection.state.account`, checked
    before the body is read. An unknown key is a 401; an address past its limit of unknown keys
    gets 429 (service.throttle.Throttled), without a query."""
    key = api_key(connection)
    auth: GuardedAuthenticator = connection.app.state.auth
    principal = await auth.authenticate(key, connection.client.host if connection.client else None) if key else None
    if principal is None:
        raise NotAuthorizedException("Send your Codeplan key as `Authorization: Bearer <key>`.")
    connection.state.account = principal.account_id


_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "unavailable": 502}
# the refusals that name the account's own state, each with a code of its own
_ACCOUNT_REFUSALS = {"suspended": ("Account suspended", "account_suspended"),
                     "closed": ("Account closed", "account_closed")}
# what a session endpoint documents besides its URL; 503: billing is off, or the database away;
# 403: a suspended account may not buy (checkout, top-up), a closed one may open nothing
_SESSION_ERRORS = problem_responses(400, 401, 403, 404, 409, 429, 502, 503)
_BUY_ERRORS = _SESSION_ERRORS


async def _session(request: Request, make) -> Response:
    account: int = request.state.account
    billing: Billing | None = request.app.state.billing
    if billing is None:
        return _problem(503, "Billing is off", "This Codeplan has no Stripe account configured; plans are "
                        "assigned by its operator.")
    try:
        url = await make(billing, account)
    except BillingError as exc:
        if exc.kind in _ACCOUNT_REFUSALS:
            title, code = _ACCOUNT_REFUSALS[exc.kind]
            return Response(msgspec.json.encode(Problem(
                type="about:blank", title=title, status=403, code=code, detail=exc.message)),
                status_code=403, media_type=MEDIA_TYPE)
        return _problem(_STATUS.get(exc.kind, 400), "Billing request refused", exc.message)
    except stripe.StripeError as exc:
        log.error("stripe request failed", extra={"account": account, "error": describe(exc)})
        return _problem(502, "Stripe did not complete the request", "Try again in a moment.")
    return Response(msgspec.json.encode(SessionURL(url=url)), media_type="application/json")


_JSON_API = {"guards": [key_holder], "before_request": strict_input, "tags": ["billing"]}


@post("/v1/billing/checkout", status_code=200, responses=_BUY_ERRORS, **_JSON_API)
async def checkout(request: Request, data: JSONBody[CheckoutRequest]) -> Response[SessionURL]:
    """A Stripe Checkout session for the plan (`interval` month or year): the URL to send the
    user to. A suspended account gets 403 (`account_suspended`), a closed one 403 (`account_closed`)."""
    return await _session(request, lambda billing, account: billing.checkout(account, data.plan, data.interval))


@post("/v1/billing/portal", status_code=200, responses=_SESSION_ERRORS, **_JSON_API)
async def portal(request: Request) -> Response[SessionURL]:
    """A Stripe customer portal session for the key's account: the URL to send the user to. A
    closed account gets 403 (`account_closed`)."""
    return await _session(request, lambda billing, account: billing.portal(account))


@post("/v1/billing/topup", status_code=200, responses=_BUY_ERRORS, **_JSON_API)
async def topup(request: Request, data: JSONBody[TopupRequest]) -> Response[SessionURL]:
    """A Stripe Checkout session for a top-up block (by its id or its credits). A suspended
    account gets 403 (`account_suspended`), a closed one 403 (`account_closed`)."""
    return await _session(request, lambda billing, account: billing.topup(account, data.block))


@get("/v1/billing", responses=problem_responses(401, 429, 503), **_JSON_API)
async def billing_state(request: Request) -> Response[BillingState]:
    """The key's account as billing sees it: subscription, its state, top-ups, overage."""
    state = await state_of(request.app.state.pool, request.app.state.config, request.state.account)
    return Response(msgspec.json.encode(state), media_type="application/json")


routes = [stripe_webhook, checkout, portal, topup, billing_state]
