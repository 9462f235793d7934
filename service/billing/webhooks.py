"""Webhook intake: verify the signature on the raw body, record the event once, answer at once.

Verification uses the `stripe` library's own scheme (HMAC-SHA256 over `t.payload`, 300 s
tolerance) against each configured secret in turn, so an endpoint's secret can be rotated with
both accepted meanwhile. Nothing is applied here: the event row is the queue (worker.py).
"""
from __future__ import annotations

import asyncpg
import msgspec

from . import stripe, wire  # stripe: loaded on first use (service/billing/__init__.py)

TOLERANCE_SECONDS = 300


class WebhookRejected(Exception):
    """A request that is not a genuine, fresh Stripe event; `reason` is safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_event_decoder = msgspec.json.Decoder(wire.Event)


def verify(payload: bytes, header: str | None, secrets: tuple[str, ...],
           tolerance: int = TOLERANCE_SECONDS) -> wire.Event:
    """The event, if `header` signs `payload` with one of `secrets` within `tolerance` seconds."""
    if not header:
        raise WebhookRejected("no Stripe-Signature header")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookRejected("the body is not UTF-8") from None
    stale = False
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, tolerance)
            break
        except stripe.SignatureVerificationError as exc:
            # the library checks the signature first, then the timestamp: a stale message means
            # this secret signed it, too long ago (a replay)
            stale = stale or "tolerance" in str(exc)
    else:
        raise WebhookRejected(f"signature timestamp older than {tolerance} seconds" if stale
                              else "no valid signature for this endpoint's secret")
    try:
        event = _event_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        raise WebhookRejected("the body is not a Stripe event") from None
    if event.object != "event":
        raise WebhookRejected("the body is not a Stripe event")
    return event


async def record(db: asyncpg.Pool | asyncpg.Connection, event: wire.Event, payload: bytes) -> bool:
    """Keep the event for the worker. False when it was received before (a redelivery)."""
    text = payload.decode("utf-8")
    if "\\u0000" in text:
        # jsonb holds no NUL, and text a customer gave Stripe may carry one: kept as U+FFFD
        # (only the event's and its object's ids are ever read from the payload)
        text = text.replace("\\u0000", "\\ufffd")
    inserted = await db.fetchval(
        "INSERT INTO stripe_events (id, type, created, livemode, payload)"
        " VALUES ($1, $2, to_timestamp($3), $4, $5::jsonb) ON CONFLICT (id) DO NOTHING RETURNING true",
        event.id, event.type, event.created, event.livemode, text)
    return bool(inserted)
