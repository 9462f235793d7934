"""Usage reports: per user, model or day; the top consumers of the last hours; revenue per
plan against what its traffic cost upstream.

Revenue is the plans' list prices (monthly_price_cents), prorated over the days each
subscription was live within the period; upstream cost is the sum of the ledger rows' recorded
costs (their profile's prices) plus the rolled-up days'.

A period of `days` days is whole UTC days: from 00:00 UTC of the day `days` days ago until now.
`codeplan rollup` moves ledger rows into per-day totals (usage_daily, by UTC day), so both halves
are cut at the same day boundary: a report reads the same before and after a rollup."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec
from litestar import Request, get
from litestar.params import FromQuery, QueryParameter

from .auth import errors

# Litestar enforces (and documents) a parameter's bounds given here, not msgspec.Meta's
Days = Annotated[int, QueryParameter(ge=1, le=366)]
Hours = Annotated[int, QueryParameter(ge=1, le=168)]
Limit = Annotated[int, QueryParameter(ge=1, le=500)]


class UsageRow(msgspec.Struct):
    key: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    credits: int
    upstream_cost_usd: float


class TopConsumer(msgspec.Struct):
    account_id: int
    email: str
    plan: str
    requests: int
    tokens: int
    credits: int
    upstream_cost_usd: float


class PlanMargin(msgspec.Struct):
    plan: str
    subscriptions: int
    revenue_usd: float
    upstream_cost_usd: float
    margin_usd: float
    margin_ratio: float | None
    credits: int
    requests: int


_GROUPS = {
    "user": "a.email",
    "model": "t.model",
    "day": "to_char(t.day, 'YYYY-MM-DD')",
}

# settled rows of the period plus the rolled-up days inside it; $1 is a UTC midnight (_since)
_USAGE_SQL = """
WITH t AS (
    SELECT l.subscription_id, (l.created_at AT TIME ZONE 'UTC')::date AS day, l.model, 1 AS requests,
           l.prompt_tokens, l.cached_tokens, l.completion_tokens, l.billed_tokens,
           coalesce(l.upstream_cost, 0) AS upstream_cost
      FROM usage_ledger l WHERE l.state IN ('posted', 'expired') AND l.created_at >= $1
    UNION ALL
    SELECT d.subscription_id, d.day, d.model, d.requests, d.prompt_tokens, d.cached_tokens,
           d.completion_tokens, d.billed_tokens, d.upstream_cost
      FROM usage_daily d WHERE d.day >= ($1 AT TIME ZONE 'UTC')::date
)
SELECT {group} AS key, sum(t.requests)::bigint AS requests, sum(t.prompt_tokens)::bigint AS prompt,
       sum(t.cached_tokens)::bigint AS cached, sum(t.completion_tokens)::bigint AS completion,
       sum(t.billed_tokens)::bigint AS credits, sum(t.upstream_cost)::float8 AS cost
  FROM t JOIN subscriptions s ON s.id = t.subscription_id JOIN accounts a ON a.id = s.account_id
 GROUP BY 1 ORDER BY credits DESC, 1 LIMIT 1000
"""


def _since(days: int) -> dt.datetime:
    """The start of a period of `days` days: 00:00 UTC of the day `days` days ago. The rolled-up
    rows are kept by UTC day, so the ledger's rows are cut at a day boundary too: cut at the hour,
    a report would count a part of a day while its rows are in the ledger, and all of it once they
    are rolled up."""
    day = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)).date()
    return dt.datetime.combine(day, dt.time(0), tzinfo=dt.timezone.utc)


@get("/reports/usage", responses=errors(400))
async def usage_report(request: Request, by: FromQuery[Literal["user", "model", "day"]] = "user",
                       days: Days = 30) -> list[UsageRow]:
    """Requests, tokens, credits and upstream cost per user, model or day, over the whole UTC
    days from the day `days` days ago until now (rolled-up days included)."""
    since = _since(days)
    rows = await request.app.state.pool.fetch(_USAGE_SQL.format(group=_GROUPS[by]), since)
    return [UsageRow(key=str(r["key"]), requests=r["requests"], prompt_tokens=r["prompt"],
                     cached_tokens=r["cached"], completion_tokens=r["completion"], credits=r["credits"],
                     upstream_cost_usd=round(r["cost"], 9)) for r in rows]


_TOP_SQL = """
SELECT a.id, a.email, s.plan_id, count(*) AS requests,
       sum(l.prompt_tokens::bigint + l.completion_tokens)::bigint AS tokens,  -- widened first: int4 + int4
       sum(l.billed_tokens)::bigint AS credits, coalesce(sum(l.upstream_cost), 0)::float8 AS cost
  FROM usage_ledger l JOIN subscriptions s ON s.id = l.subscription_id JOIN accounts a ON a.id = s.account_id
 WHERE l.state IN ('posted', 'expired') AND l.created_at >= now() - make_interval(hours => $1)
 GROUP BY a.id, a.email, s.plan_id ORDER BY credits DESC LIMIT $2
"""


@get("/reports/top", responses=errors(400))
async def top_consumers(request: Request, hours: Hours = 5,
                        limit: Limit = 20) -> list[TopConsumer]:
    rows = await request.app.state.pool.fetch(_TOP_SQL, hours, limit)
    return [TopConsumer(account_id=r["id"], email=r["email"], plan=r["plan_id"], requests=r["requests"],
                        tokens=r["tokens"], credits=r["credits"], upstream_cost_usd=round(r["cost"], 9))
            for r in rows]


_MARGIN_SQL = """
WITH period AS (SELECT $1::timestamptz AS since, now() AS until),
live AS (
    SELECT s.plan_id, count(*) AS subs,
           sum(extract(epoch FROM least(coalesce(s.ended_at, p.until), p.until)
                                  - greatest(s.started_at, p.since)) / 86400.0) AS days
      FROM subscriptions s, period p
     WHERE s.started_at < p.until AND coalesce(s.ended_at, p.until) > p.since
     GROUP BY s.plan_id
),
used AS (
    SELECT s.plan_id, count(*) AS requests, sum(l.billed_tokens)::bigint AS credits,
           coalesce(sum(l.upstream_cost), 0) AS cost
      FROM usage_ledger l JOIN subscriptions s ON s.id = l.subscription_id, period p
     WHERE l.state IN ('posted', 'expired') AND l.created_at >= p.since
     GROUP BY s.plan_id
    UNION ALL
    SELECT s.plan_id, sum(d.requests), sum(d.billed_tokens)::bigint, sum(d.upstream_cost)
      FROM usage_daily d JOIN subscriptions s ON s.id = d.subscription_id, period p
     WHERE d.day >= (p.since AT TIME ZONE 'UTC')::date
     GROUP BY s.plan_id
)
SELECT pl.id, coalesce(lv.subs, 0) AS subs,
       coalesce(lv.days, 0) * pl.monthly_price_cents / 100.0 / 30.0 AS revenue,
       coalesce((SELECT sum(u.cost) FROM used u WHERE u.plan_id = pl.id), 0)::float8 AS cost,
       coalesce((SELECT sum(u.credits) FROM used u WHERE u.plan_id = pl.id), 0)::bigint AS credits,
       coalesce((SELECT sum(u.requests) FROM used u WHERE u.plan_id = pl.id), 0)::bigint AS requests
  FROM plans pl LEFT JOIN live lv ON lv.plan_id = pl.id
 ORDER BY pl.window_tokens, pl.id
"""


@get("/reports/margin", responses=errors(400))
async def margin_report(request: Request, days: Days = 30) -> list[PlanMargin]:
    """Per plan: list-price revenue prorated over the period, against upstream cost. The period
    is the whole UTC days from the day `days` days ago until now (rolled-up days included)."""
    since = _since(days)
    out = []
    for r in await request.app.state.pool.fetch(_MARGIN_SQL, since):
        revenue = float(r["revenue"])
        cost = float(r["cost"])
        out.append(PlanMargin(plan=r["id"], subscriptions=r["subs"], revenue_usd=round(revenue, 6),
                              upstream_cost_usd=round(cost, 9), margin_usd=round(revenue - cost, 6),
                              margin_ratio=round((revenue - cost) / revenue, 4) if revenue else None,
                              credits=r["credits"], requests=r["requests"]))
    return out


routes = [usage_report, top_consumers, margin_report]
