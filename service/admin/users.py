"""Users: find, look at, suspend and restore, change plan or admin rights, grant a top-up."""
from __future__ import annotations

import datetime as dt
from typing import Annotated

import asyncpg
import msgspec
from litestar import Request, get, patch, post
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import JSONBody, PathParameter, QueryParameter

from . import audit
from .auth import errors
from .. import usage

# Litestar enforces (and documents) a parameter's bounds given here, not msgspec.Meta's
Limit = Annotated[int, QueryParameter(ge=1, le=500)]
AccountId = Annotated[int, PathParameter(ge=1, le=2**63 - 1)]  # accounts.id is a bigint


class UserSummary(msgspec.Struct):
    id: int
    email: str
    plan: str | None
    status: str | None
    suspended: bool
    is_admin: bool
    created_at: dt.datetime
    # closed by its owner (the web's Account page): its row stays for the ledger, invoices and the
    # audit; its address is a placeholder (closed-<id>@closed.invalid), its keys revoked
    closed: bool = False


class KeyView(msgspec.Struct):
    prefix: str
    name: str
    created_at: dt.datetime
    revoked: bool


class WindowView(msgspec.Struct):
    kind: str
    allowance: int
    used: int
    reserved: int
    remaining: int
    resets_at: dt.datetime | None


class UserDetail(msgspec.Struct):
    user: UserSummary
    subscription_id: int | None
    keys: list[KeyView]
    windows: list[WindowView]


class UserChange(msgspec.Struct, forbid_unknown_fields=True):
    plan: str | None = None
    is_admin: bool | None = None


class TopUp(msgspec.Struct, forbid_unknown_fields=True):
    # at most a trillion: far past any plan, and the ledger's bigint sums stay far from overflow
    credits: Annotated[int, msgspec.Meta(gt=0, le=10**12)]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class Granted(msgspec.Struct):
    granted: int  # credits
    topup_id: int
    window_id: int | None  # None: no live subscription yet; the block waits for the next one


_USER_SQL = """
SELECT a.id, a.email, a.is_admin, a.suspended_at, a.created_at, a.closed_at, s.id AS subscription_id,
       s.plan_id, s.status
  FROM accounts a
  LEFT JOIN subscriptions s ON s.account_id = a.id AND s.status <> 'canceled'
"""


def _summary(row: asyncpg.Record) -> UserSummary:
    return UserSummary(id=row["id"], email=row["email"], plan=row["plan_id"], status=row["status"],
                       suspended=row["suspended_at"] is not None, is_admin=row["is_admin"],
                       created_at=row["created_at"], closed=row["closed_at"] is not None)


async def _one(conn, account_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(_USER_SQL + " WHERE a.id = $1", account_id)
    if row is None:
        raise NotFoundException(f"no account {account_id}")
    return row


@get("/users", responses=errors(400))
async def find_users(request: Request, q: Annotated[str, QueryParameter(pattern=r"^[^\x00]*$")] = "",
                     limit: Limit = 50) -> list[UserSummary]:
    """Accounts whose email contains `q` (all when empty), newest first."""
    pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = await request.app.state.pool.fetch(
        _USER_SQL + " WHERE a.email ILIKE $1 ORDER BY a.id DESC LIMIT $2", pattern, limit)
    return [_summary(r) for r in rows]


@get("/users/{account_id:int}", responses=errors(400, 404))
async def user_detail(request: Request, account_id: AccountId) -> UserDetail:
    pool = request.app.state.pool
    row = await _one(pool, account_id)
    keys = await pool.fetch("SELECT prefix, name, created_at, revoked_at FROM api_keys"
                            " WHERE account_id = $1 ORDER BY id", account_id)
    windows: list[WindowView] = []
    if row["subscription_id"] is not None:
        _, states = await usage.current_windows(pool, row["subscription_id"])
        windows = [WindowView(kind=w.kind, allowance=w.allowance, used=w.used, reserved=w.reserved,
                              remaining=w.remaining, resets_at=w.ends_at) for w in states]
    return UserDetail(user=_summary(row), subscription_id=row["subscription_id"],
                      keys=[KeyView(prefix=k["prefix"], name=k["name"], created_at=k["created_at"],
                                    revoked=k["revoked_at"] is not None) for k in keys],
                      windows=windows)


async def _set_suspended(request: Request, account_id: int, suspended: bool) -> UserSummary:
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        before = await _one(conn, account_id)
        await conn.execute(
            "UPDATE accounts SET suspended_at = CASE WHEN $2 THEN coalesce(suspended_at, now()) END"
            " WHERE id = $1", account_id, suspended)
        after = await _one(conn, account_id)
        await audit.record(conn, request.state.actor, "user.suspend" if suspended else "user.restore",
                           f"account:{account_id}", audit.row(before), audit.row(after))
        return _summary(after)


@post("/users/{account_id:int}/suspend", status_code=200, responses=errors(400, 404))
async def suspend_user(request: Request, account_id: AccountId) -> UserSummary:
    """Refused at the next admission (every process: the ledger checks it), 403 to the user."""
    return await _set_suspended(request, account_id, True)


@post("/users/{account_id:int}/restore", status_code=200, responses=errors(400, 404))
async def restore_user(request: Request, account_id: AccountId) -> UserSummary:
    return await _set_suspended(request, account_id, False)


@patch("/users/{account_id:int}", responses=errors(400, 404, 409))
async def change_user(request: Request, account_id: AccountId,
                      data: JSONBody[UserChange]) -> UserSummary:
    """Move the account's subscription to another plan (its open windows take the new
    allowances), or grant or take admin rights. An account without a live subscription gets one
    on the plan (with the top-ups waiting for it, as a subscription paid through Stripe would).
    The plan of a subscription paid through Stripe is Stripe's: changing it here is a 409 (the
    next event from Stripe would put Stripe's back); it changes in Stripe (the Customer Portal, or
    the Stripe dashboard)."""
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        # the lock order of every plan change (billing_apply_subscription's too): the account,
        # the subscription, then its mutex, then its windows by id. Taken first, before the
        # account is read: two changes at once then see each other's subscription, instead of
        # both inserting one (subscriptions_one_live)
        await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE", account_id)
        before = await _one(conn, account_id)
        if data.plan is not None and before["closed_at"] is not None:
            # its keys are revoked and nobody signs in to it: a plan would be paid for by nobody
            raise HTTPException(status_code=409, detail=f"account {account_id} is closed")
        if data.plan is not None:
            plan = await conn.fetchrow("SELECT id, retired_at FROM plans WHERE id = $1", data.plan)
            if plan is None:
                raise HTTPException(status_code=400, detail=f"no plan {data.plan!r}")
            if plan["retired_at"] is not None:
                raise HTTPException(status_code=400, detail=f"plan {data.plan!r} is retired")
            if before["subscription_id"] is None:
                subscription = await _subscribe(conn, account_id, data.plan)
            else:
                subscription = before["subscription_id"]
                paid = await conn.fetchval("SELECT stripe_subscription_id IS NOT NULL FROM subscriptions"
                                           " WHERE id = $1", before["subscription_id"])
                if paid and data.plan != before["plan_id"]:
                    # Codeplan has no way to change a Stripe subscription's item: a plan set here
                    # would be undone by Stripe's next event for it (migrations/0046)
                    raise HTTPException(status_code=409, detail=(
                        f"account {account_id} pays for its plan through Stripe: its plan changes in Stripe "
                        "(the user's Customer Portal, or the subscription in the Stripe dashboard)"))
                await conn.execute("UPDATE subscriptions SET plan_id = $2 WHERE id = $1",
                                   before["subscription_id"], data.plan)
                await conn.execute("INSERT INTO subscription_flights (subscription_id) VALUES ($1)"
                                   " ON CONFLICT DO NOTHING", before["subscription_id"])
                await conn.execute("SELECT 1 FROM subscription_flights WHERE subscription_id = $1"
                                   " FOR NO KEY UPDATE", before["subscription_id"])
                # the plan's windows only: top-up and overage windows keep their own allowances
                await conn.execute(
                    "SELECT 1 FROM quota_windows WHERE subscription_id = $1 AND ends_at > now()"
                    " AND kind IN ('5h', 'week') ORDER BY id FOR NO KEY UPDATE", before["subscription_id"])
                await conn.execute(
                    "UPDATE quota_windows q SET allowance = CASE WHEN q.kind = '5h' THEN p.window_tokens"
                    " ELSE p.weekly_tokens END FROM plans p"
                    " WHERE p.id = $2 AND q.subscription_id = $1 AND q.ends_at > now()"
                    " AND q.kind IN ('5h', 'week')",
                    before["subscription_id"], data.plan)
            # the live sockets (service/web/live.py) read the figures again when this commits, as
            # after a settlement: the new allowances (or the account's new subscription) at once,
            # not at the next settlement
            await conn.execute("SELECT pg_notify('codeplan_usage', $1)", str(subscription))
        if data.is_admin is not None:
            await conn.execute("UPDATE accounts SET is_admin = $2 WHERE id = $1", account_id, data.is_admin)
        after = await _one(conn, account_id)
        await audit.record(conn, request.state.actor, "user.change", f"account:{account_id}",
                           audit.row(before), audit.row(after))
        return _summary(after)


async def _subscribe(conn: asyncpg.Connection, account_id: int, plan: str) -> int:
    """A live subscription on `plan` for an account without one (the account row locked), with
    what the Stripe path gives a new subscription (billing_apply_subscription, migrations/0046):
    the unexpired top-up windows of its ended subscriptions, and the blocks granted or bought
    while it had none. Returns its id."""
    try:
        subscription = await conn.fetchval(
            "INSERT INTO subscriptions (account_id, plan_id, status) VALUES ($1, $2, 'active') RETURNING id",
            account_id, plan)
    except asyncpg.UniqueViolationError as exc:
        # a writer that does not take the account row first (Stripe's path does) made one in
        # between: said, never a 500
        if exc.constraint_name != "subscriptions_one_live":
            raise
        raise HTTPException(status_code=409, detail=f"account {account_id} was given a subscription "
                            "meanwhile; look at it again") from None
    # top-ups outlive the subscription they were bought under: the ended ones' windows move here
    # (under each one's mutex, in id order, like billing_apply_subscription)
    await conn.execute(
        "SELECT 1 FROM subscription_flights f WHERE f.subscription_id IN ("
        "  SELECT q.subscription_id FROM quota_windows q JOIN subscriptions s ON s.id = q.subscription_id"
        "   WHERE s.account_id = $1 AND s.status = 'canceled' AND q.kind = 'topup' AND q.ends_at > now())"
        " ORDER BY f.subscription_id FOR NO KEY UPDATE", account_id)
    await conn.execute(
        "UPDATE quota_windows q SET subscription_id = $2 FROM subscriptions s"
        " WHERE s.id = q.subscription_id AND s.account_id = $1 AND s.status = 'canceled'"
        " AND q.kind = 'topup' AND q.ends_at > now()", account_id, subscription)
    # blocks granted (or bought) while the account had no live subscription
    await conn.execute("SELECT billing_topup_attach(t.id) FROM topups t WHERE t.account_id = $1"
                       " AND t.window_id IS NULL AND t.expires_at > now() ORDER BY t.id", account_id)
    return subscription


@post("/users/{account_id:int}/topups", status_code=201, responses=errors(400, 404))
async def grant_topup(request: Request, account_id: AccountId, data: JSONBody[TopUp]) -> Granted:
    """A top-up granted by an operator: a block of credits, spent only on what the plan's windows
    cannot hold, for 365 days, like a bought one (billing's `topups` row and `topup` window,
    migrations/0011 and 0031). Without a live subscription it waits for the next one."""
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        await _one(conn, account_id)
        granted = await conn.fetchrow(
            "INSERT INTO topups (account_id, tokens, amount, currency, expires_at, stripe_checkout_session_id)"
            " VALUES ($1, $2, 0, 'usd', now() + interval '365 days', 'admin-grant-' || gen_random_uuid())"
            " RETURNING *", account_id, data.credits)
        window = await conn.fetchval("SELECT billing_topup_attach($1)", granted["id"])
        await audit.record(conn, request.state.actor, "user.topup", f"account:{account_id}", None,
                           {**audit.row(granted), "window_id": window, "reason": data.reason})
        return Granted(granted=data.credits, topup_id=granted["id"], window_id=window)


routes = [find_users, user_detail, suspend_user, restore_user, change_user, grant_topup]
