"""Plans: list, create, change allowances, prices, models and credit coefficients, retire.

A plan's allowances are in credits per 5-hour window and per week (migrations/0030); a change
reaches its subscriptions' open windows, and their live sockets, at once (`plan_apply_allowances`,
under the ledger's lock order; migrations/0056)."""
from __future__ import annotations

from typing import Annotated

import asyncpg
import msgspec
from litestar import Request, get, patch, post, put
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, JSONBody

from bridge.models import CATALOG

from . import audit
from .auth import errors
from ..credits import Coefficient, ModelCredits, PeakMultiplier, plan_credits

PlanId = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"^[a-z0-9_\-]+$")]
# bounded by their columns (bigint, integer): a value past them is the caller's 400, not a 500.
# Allowances by less than a bigint: 2^53 - 1, the largest integer every JSON reader (a browser's
# doubles) reads exactly, ~9 * 10^15 credits, as good as unlimited; and the ledger's sums of a
# window's figures (posted, held, a request's hold) then stay far below a bigint's 2^63.
MAX_CREDITS = 2**53 - 1
Credits = Annotated[int, msgspec.Meta(gt=0, le=MAX_CREDITS,
                                      description=f"credits, 1 to {MAX_CREDITS} (2^53 - 1: as good as unlimited)")]
Cents = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Concurrency = Annotated[int, msgspec.Meta(gt=0, le=100_000)]
PlanName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class PlanView(msgspec.Struct):
    id: str
    name: str
    window_credits: int
    weekly_credits: int
    max_concurrent: int | None
    monthly_price_cents: int
    models: list[str]
    retired: bool
    subscriptions: int
    credits: dict[str, ModelCredits]


class NewPlan(msgspec.Struct, forbid_unknown_fields=True):
    id: PlanId
    name: PlanName
    window_credits: Credits
    weekly_credits: Credits
    monthly_price_cents: Cents
    models: list[str]
    max_concurrent: Concurrency | None = None


class PlanChange(msgspec.Struct, forbid_unknown_fields=True):
    name: PlanName | None = None
    window_credits: Credits | None = None
    weekly_credits: Credits | None = None
    monthly_price_cents: Cents | None = None
    models: list[str] | None = None
    max_concurrent: Concurrency | None = None
    unlimited_concurrency: bool = False


class CreditChange(msgspec.Struct, forbid_unknown_fields=True):
    input: Coefficient
    cached: Coefficient
    output: Coefficient
    # None (or left out): the model's own multiplier (plan_credits.peak_multiplier NULL, migrations/0049)
    peak_multiplier: PeakMultiplier | None = None


_PLAN_SQL = """
SELECT p.*, (SELECT count(*) FROM subscriptions s WHERE s.plan_id = p.id AND s.status <> 'canceled') AS subs
  FROM plans p WHERE ($1::text IS NULL OR p.id = $1) ORDER BY p.window_tokens, p.id
"""


async def _view(conn, row: asyncpg.Record) -> PlanView:
    return PlanView(id=row["id"], name=row["name"], window_credits=row["window_tokens"],
                    weekly_credits=row["weekly_tokens"], max_concurrent=row["max_concurrent"],
                    monthly_price_cents=row["monthly_price_cents"], models=list(row["models"]),
                    retired=row["retired_at"] is not None, subscriptions=row["subs"],
                    credits=await plan_credits(conn, row["id"], list(row["models"])))


def _check_models(models: list[str]) -> None:
    unknown = [m for m in models if m not in CATALOG]
    if unknown or not models:
        raise HTTPException(status_code=400, detail=f"unknown models {unknown}; served: {', '.join(CATALOG)}"
                            if unknown else "a plan serves at least one model")


async def _one(conn, plan_id: str) -> asyncpg.Record:
    row = await conn.fetchrow(_PLAN_SQL, plan_id)
    if row is None:
        raise NotFoundException(f"no plan {plan_id!r}")
    return row


@get("/plans", responses=errors())
async def list_plans(request: Request) -> list[PlanView]:
    async with request.app.state.pool.acquire() as conn:
        return [await _view(conn, r) for r in await conn.fetch(_PLAN_SQL, None)]


@post("/plans", status_code=201, responses=errors(400, 409))
async def create_plan(request: Request, data: JSONBody[NewPlan]) -> PlanView:
    _check_models(data.models)
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        try:
            await conn.execute(
                "INSERT INTO plans (id, name, window_tokens, weekly_tokens, max_concurrent,"
                " monthly_price_cents, models) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                data.id, data.name, data.window_credits, data.weekly_credits, data.max_concurrent,
                data.monthly_price_cents, data.models)
        except asyncpg.UniqueViolationError:
            raise HTTPException(status_code=409, detail=f"plan {data.id!r} exists already") from None
        after = await _one(conn, data.id)
        await audit.record(conn, request.state.actor, "plan.create", f"plan:{data.id}", None, audit.row(after))
        return await _view(conn, after)


@patch("/plans/{plan_id:str}", responses=errors(400, 404))
async def change_plan(request: Request, plan_id: FromPath[str],
                      data: JSONBody[PlanChange]) -> PlanView:
    if data.models is not None:
        _check_models(data.models)
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        # the plan's row first (the lock its UPDATE takes, a statement earlier): the allowances
        # read are the ones this change replaces, whatever another change does meanwhile
        await conn.execute("SELECT 1 FROM plans WHERE id = $1 FOR NO KEY UPDATE", plan_id)
        before = await _one(conn, plan_id)
        await conn.execute(
            "UPDATE plans SET name = coalesce($2, name), window_tokens = coalesce($3, window_tokens),"
            " weekly_tokens = coalesce($4, weekly_tokens),"
            " monthly_price_cents = coalesce($5, monthly_price_cents), models = coalesce($6, models),"
            " max_concurrent = CASE WHEN $8 THEN NULL ELSE coalesce($7, max_concurrent) END WHERE id = $1",
            plan_id, data.name, data.window_credits, data.weekly_credits, data.monthly_price_cents,
            data.models, data.max_concurrent, data.unlimited_concurrency)
        # only an allowance that changes reaches the windows: plan_apply_allowances tells the live
        # feed of every subscription whose figures it moves, and with nothing changed none moved
        if data.window_credits not in (None, before["window_tokens"]) \
                or data.weekly_credits not in (None, before["weekly_tokens"]):
            await conn.execute("SELECT plan_apply_allowances($1)", plan_id)
        after = await _one(conn, plan_id)
        await audit.record(conn, request.state.actor, "plan.change", f"plan:{plan_id}",
                           audit.row(before), audit.row(after))
        return await _view(conn, after)


@put("/plans/{plan_id:str}/credits/{model:str}", responses=errors(400, 404))
async def set_plan_credits(request: Request, plan_id: FromPath[str], model: FromPath[str],
                           data: JSONBody[CreditChange]) -> PlanView:
    """The coefficients this plan bills `model` at (overriding the model's own)."""
    if model not in CATALOG:
        raise HTTPException(status_code=400, detail=f"unknown model {model!r}; served: {', '.join(CATALOG)}")
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        plan = await _one(conn, plan_id)
        before = await conn.fetchrow("SELECT * FROM plan_credits WHERE plan_id = $1 AND model = $2", plan_id, model)
        await conn.execute(
            "INSERT INTO plan_credits (plan_id, model, input_coeff, cached_coeff, output_coeff, peak_multiplier)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (plan_id, model) DO UPDATE SET"
            " input_coeff = excluded.input_coeff, cached_coeff = excluded.cached_coeff,"
            " output_coeff = excluded.output_coeff, peak_multiplier = excluded.peak_multiplier",
            plan_id, model, data.input, data.cached, data.output, data.peak_multiplier)
        after = await conn.fetchrow("SELECT * FROM plan_credits WHERE plan_id = $1 AND model = $2", plan_id, model)
        await audit.record(conn, request.state.actor, "plan.credits", f"plan:{plan_id}/{model}",
                           audit.row(before), audit.row(after))
        return await _view(conn, plan)


@post("/plans/{plan_id:str}/retire", status_code=200, responses=errors(400, 404))
async def retire_plan(request: Request, plan_id: FromPath[str]) -> PlanView:
    """No new subscriptions on it; those on it keep it."""
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        before = await _one(conn, plan_id)
        await conn.execute("UPDATE plans SET retired_at = coalesce(retired_at, now()) WHERE id = $1", plan_id)
        after = await _one(conn, plan_id)
        await audit.record(conn, request.state.actor, "plan.retire", f"plan:{plan_id}",
                           audit.row(before), audit.row(after))
        return await _view(conn, after)


routes = [list_plans, create_plan, change_plan, set_plan_credits, retire_plan]
