"""The usage ledger: a two-phase state machine over `usage_ledger` and `quota_windows`.

    pending --post--> posted      the upstream's usage (or, failing that, what we delivered)
            --void--> voided      nothing was served
            --sweep-> expired     the process that held it died; settled at what it can prove

Every transition is one call of a guarded SQL function (migrations/0001_init.sql) in one
transaction, so a replay or a race between two settlers applies it at most once.
"""
from __future__ import annotations

import datetime as dt
import logging
import uuid

import asyncpg
import msgspec

log = logging.getLogger("codeplan.ledger")


class Admission(msgspec.Struct, frozen=True):
    outcome: str  # admitted | replayed | inactive | too_large | window_full | concurrency
    window_kind: str | None = None  # '5h' or 'week' for too_large / window_full
    resets_at: dt.datetime | None = None
    allowance: int | None = None

    @property
    def admitted(self) -> bool:
        return self.outcome == "admitted"


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


class Ledger:
    def __init__(self, pool: asyncpg.Pool, *, lease_seconds: float) -> None:
        self._pool = pool
        self._lease = lease_seconds

    @staticmethod
    def new_id() -> uuid.UUID:
        return uuid.uuid4()

    async def admit(self, entry_id: uuid.UUID, *, subscription_id: int, api_key_id: int,
                    surface: str, model: str, prompt_estimate: int, reserve: int) -> Admission:
        row = await self._pool.fetchrow(
            "SELECT * FROM ledger_admit($1, $2, $3, $4, $5, $6, $7, $8)",
            entry_id, subscription_id, api_key_id, surface, model, prompt_estimate, reserve,
            self._lease)
        return Admission(outcome=row["outcome"], window_kind=row["window_kind"],
                         resets_at=row["resets_at"], allowance=row["allowance"])

    async def post(self, entry_id: uuid.UUID, usage: Usage, *, estimated: bool, reason: str,
                   upstream_request_id: str | None = None) -> int | None:
        """Settle at real usage. Returns the billed tokens, or None if it was settled already."""
        return await self._settle(entry_id, "posted", usage, estimated, reason, upstream_request_id)

    async def void(self, entry_id: uuid.UUID, *, reason: str,
                   upstream_request_id: str | None = None) -> int | None:
        return await self._settle(entry_id, "voided", Usage(), False, reason, upstream_request_id)

    async def _settle(self, entry_id: uuid.UUID, state: str, usage: Usage, estimated: bool,
                      reason: str, upstream_request_id: str | None) -> int | None:
        billed = await self._pool.fetchval(
            "SELECT billed FROM ledger_settle($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            entry_id, state, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
            usage.reasoning_tokens, estimated, reason, upstream_request_id)
        if billed is None:
            log.warning("settlement ignored: entry not pending",
                        extra={"entry": str(entry_id), "state": state})
        return billed

    async def heartbeat(self, entry_id: uuid.UUID, delivered_tokens: int) -> bool:
        """Extend a live request's lease and record the completion tokens it has delivered.
        False when the entry is no longer pending."""
        status = await self._pool.execute(
            "UPDATE usage_ledger SET delivered_tokens = $2,"
            " lease_until = now() + make_interval(secs => $3)"
            " WHERE id = $1 AND state = 'pending'",
            entry_id, delivered_tokens, self._lease)
        return status == "UPDATE 1"

    async def expire_due(self, limit: int = 500) -> int:
        rows = await self._pool.fetch("SELECT * FROM ledger_expire_due($1)", limit)
        if rows:
            log.warning("expired pending reservations", extra={"count": len(rows)})
        return len(rows)

    async def rollup(self, before: dt.datetime) -> int:
        """Move settled rows created before `before` into per-day aggregates; totals unchanged."""
        return await self._pool.fetchval("SELECT ledger_rollup($1)", before)
