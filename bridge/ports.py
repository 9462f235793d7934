"""What the bridge needs from the business side, declared here and implemented by `service/`.

The bridge never imports `service/`: it asks for a key's owner (`KeyAuthority`), for an
allowance reservation and its settlement (`LedgerPort`), and nothing else. The values crossing
the boundary are the Structs below.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Protocol

import msgspec


class Principal(msgspec.Struct, frozen=True):
    """Who a request is from. `subscription_id` is None when the account has no subscription
    that could ever spend (none, or canceled): such a key is known, not invalid."""
    account_id: int
    api_key_id: int
    subscription_id: int | None
    plan_id: str | None
    models: tuple[str, ...]
    # the subscription's state as billing knows it ("active", "past_due", ...); None: none
    standing: str | None = None
    # an operator suspended the account (admin API). Its requests are refused at their admission,
    # which reads the account itself; the Responses socket, which has no admission before its
    # first turn, refuses its handshake on this (as fresh as the key's authentication)
    suspended: bool = False


class Reservation(msgspec.Struct, frozen=True):
    """An admission request: hold `held` tokens of every open window (the worst case the request
    can cost), show `reserve` of them as reserved (the expected cost)."""
    entry_id: uuid.UUID
    subscription_id: int
    api_key_id: int
    surface: str
    model: str
    prompt_estimate: int
    reserve: int
    held: int


class Admission(msgspec.Struct, frozen=True):
    # admitted | replayed | inactive | too_large | window_full | concurrency | voided (its void
    # came first: only a try nobody waits for any more gets it, migrations/0044)
    outcome: str
    window_kind: str | None = None  # '5h' or 'week' for too_large / window_full
    resets_at: dt.datetime | None = None
    allowance: int | None = None
    # for inactive: why the subscription may not spend (its billing state)
    detail: str | None = None
    # the largest hold, in tokens, the subscription's windows (the plan's room plus its roomiest
    # top-up or overage window) could still give a request after this admission
    room: int | None = None

    @property
    def admitted(self) -> bool:
        # a replay is an admission whose first reply was lost: the row exists, it was admitted
        return self.outcome in ("admitted", "replayed")


class Counts(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


class Settlement(msgspec.Struct, frozen=True):
    """pending -> posted (`state="posted"`) or voided, with the counts it settles at."""
    entry_id: uuid.UUID
    state: str  # posted | voided
    counts: Counts
    estimated: bool
    reason: str
    upstream_request_id: str | None = None
    # the upstream profile that served it and what that cost, in USD (its prices)
    upstream: str | None = None
    upstream_cost: float | None = None
    # whose windows it releases; None when the settler does not know (the ledger then assumes
    # it may be anyone's: service/ledger.py `_Ticker`)
    subscription_id: int | None = None
    # a void of an admission whose answer nobody heard (bridge/flight.py `void_abandoned`): that
    # admission may still be in flight in the database, and the ledger waits for it
    abandoned: bool = False


class KeyAuthority(Protocol):
    async def authenticate(self, key: str) -> Principal | None:
        """The key's owner, or None for a key that does not exist or was revoked."""


class LedgerPort(Protocol):
    def admit(self, reservation: Reservation) -> "asyncio.Future[Admission]":
        """Queued at once, so the database works on it while the upstream request is built;
        the future holds the answer, or the database's failure (the ledger then voids the
        entry it may have written: the caller forwards nothing). Cancelling it, or answering it
        first (`Journey.answer_overdue`), abandons the admission: one not yet sent is never
        sent, an entry admitted meanwhile is voided."""

    def settle(self, settlement: Settlement) -> "asyncio.Future[int | None]":
        """Queued at once; the future holds the billed credits, or None when the entry was
        settled already (a replay: the first settlement's reply was lost), or the database's
        failure (safe to settle again). A future, not a coroutine: the bridge settles every
        request and keeps no task per settlement (bridge/flight.py)."""

    async def heartbeat(self, entry_id: uuid.UUID, delivered_tokens: int) -> bool:
        """Extend the lease; False when the entry is no longer pending."""
