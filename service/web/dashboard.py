"""What the dashboard shows, read from the database: plan, windows, 30 days of tokens, today."""
from __future__ import annotations

import datetime as dt

import asyncpg
import msgspec

from bridge.journey import iso_utc

from .. import usage
from . import chart

UTC = dt.timezone.utc
CHART_DAYS = 30


class Subscription(msgspec.Struct, frozen=True):
    id: int
    plan_id: str
    plan_name: str
    status: str
    started_at: str
    billed_by_stripe: bool
    window_tokens: int
    weekly_tokens: int
    monthly_price_cents: int


class Meter(msgspec.Struct, frozen=True):
    kind: str
    allowance: int
    used: int
    reserved: int
    remaining: int
    used_pct: float
    reserved_pct: float
    resets_at: str | None


class RequestRow(msgspec.Struct, frozen=True):
    at: str
    model: str
    surface: str
    state: str
    prompt_tokens: int
    completion_tokens: int
    billed_tokens: int


class Extra(msgspec.Struct, frozen=True):
    """A table of the account's extra windows of one kind (top-ups, overage). The title and
    the columns are the English words the page translates; each row holds the figures as digits
    and the end as UTC ISO 8601, which the page formats as it does the meters' (thousands
    separators, the viewer's local time)."""
    title: str
    columns: list[str]
    rows: list[list[str]]


class Dashboard(msgspec.Struct, frozen=True):
    subscription: Subscription | None
    meters: list[Meter]
    chart: chart.Chart
    today_requests: int
    today_tokens: int
    recent: list[RequestRow]
    extras: list[Extra]


async def subscription(pool: asyncpg.Pool, account_id: int) -> Subscription | None:
    row = await pool.fetchrow(
        """SELECT s.id, s.plan_id, p.name AS plan_name, s.status, s.started_at,
                  s.stripe_subscription_id IS NOT NULL AS billed_by_stripe, p.window_tokens,
                  p.weekly_tokens, p.monthly_price_cents
             FROM subscriptions s JOIN plans p ON p.id = s.plan_id
            WHERE s.account_id = $1 AND s.status <> 'canceled' ORDER BY s.id DESC LIMIT 1""", account_id)
    if row is None:
        return None
    values = dict(row)
    values["started_at"] = iso_utc(values["started_at"])
    return Subscription(**values)


def meter(kind: str, allowance: int, used: int, reserved: int, remaining: int,
          resets_at: str | None) -> Meter:
    whole = max(allowance, 1)
    used_pct = min(100.0, round(100 * used / whole, 2))
    return Meter(kind=kind, allowance=allowance, used=used, reserved=reserved, remaining=remaining,
                 used_pct=used_pct, reserved_pct=min(100.0 - used_pct, round(100 * reserved / whole, 2)),
                 resets_at=resets_at)


async def meters(pool: asyncpg.Pool, subscription_id: int) -> list[Meter]:
    _, states = await usage.current_windows(pool, subscription_id)
    return [meter(w.kind, w.allowance, w.used, w.reserved, w.remaining,
                  iso_utc(w.ends_at) if w.ends_at else None) for w in states]


_DAILY_SQL = """
SELECT day, model, sum(billed)::bigint AS tokens FROM (
    SELECT (l.created_at AT TIME ZONE 'UTC')::date AS day, l.model, l.billed_tokens AS billed
      FROM usage_ledger l
     WHERE l.subscription_id = ANY($1::bigint[]) AND l.created_at >= $2 AND l.state IN ('posted', 'expired')
    UNION ALL
    SELECT d.day, d.model, d.billed_tokens FROM usage_daily d
     WHERE d.subscription_id = ANY($1::bigint[]) AND d.day >= ($2 AT TIME ZONE 'UTC')::date
) t GROUP BY day, model
"""

# today's settled requests over all the account's subscriptions (a re-subscription the same day
# keeps the morning's): the page's figure and the live feed's (live.snapshot), this one query.
# The table below also shows those still in flight and those voided. (A rollup never takes
# today's rows: it keeps the last 8 days, service/commands.py.)
_TODAY_SQL = """
SELECT count(*) AS requests, coalesce(sum(billed_tokens), 0)::bigint AS tokens
  FROM usage_ledger
 WHERE subscription_id = ANY(ARRAY(SELECT id FROM subscriptions WHERE account_id = $1))
   AND created_at >= $2 AND state IN ('posted', 'expired')
"""


async def today_totals(pool: asyncpg.Pool, account_id: int, since: dt.datetime) -> tuple[int, int]:
    """(requests, billed tokens) settled since `since` (today's start) on any of the account's
    subscriptions."""
    row = await pool.fetchrow(_TODAY_SQL, account_id, since)
    return row["requests"], row["tokens"]


_RECENT_SQL = """
SELECT created_at, model, surface, state, prompt_tokens, completion_tokens, billed_tokens
  FROM usage_ledger WHERE subscription_id = ANY($1::bigint[]) AND created_at >= $2
 ORDER BY created_at DESC LIMIT 20
"""


# the account's open extra windows: top-up blocks and this period's overage (billing, 0011/0031)
_EXTRAS_SQL = """
SELECT q.kind, q.allowance, q.posted, q.held, q.starts_at, q.ends_at
  FROM quota_windows q JOIN subscriptions s ON s.id = q.subscription_id
 WHERE s.account_id = $1 AND q.kind IN ('topup', 'overage') AND q.ends_at > now()
 ORDER BY q.kind DESC, q.ends_at
"""
# (i18n.ZH has each; "ends" is the column dashboard.html shows as a time)
_EXTRA_COLUMNS = ["allowance", "used", "in flight", "remaining", "ends"]


async def _extras(pool: asyncpg.Pool, account_id: int) -> list[Extra]:
    """Top-up blocks and overage, when the account has any (credits, like the windows)."""
    rows = await pool.fetch(_EXTRAS_SQL, account_id)
    found = []
    for kind, title in (("topup", "Top-ups"), ("overage", "Overage")):
        mine = [r for r in rows if r["kind"] == kind]
        if mine:
            found.append(Extra(title=title, columns=_EXTRA_COLUMNS, rows=[
                [str(r["allowance"]), str(r["posted"]), str(r["held"]),
                 str(max(0, r["allowance"] - r["posted"] - r["held"])), _cell(r["ends_at"])] for r in mine]))
    return found


def _cell(value: object) -> str:
    if isinstance(value, dt.datetime):
        return iso_utc(value)
    return "" if value is None else str(value)


async def load(pool: asyncpg.Pool, account_id: int) -> Dashboard:
    sub = await subscription(pool, account_id)
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM subscriptions WHERE account_id = $1", account_id)]
    now = dt.datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    since = today - dt.timedelta(days=CHART_DAYS - 1)
    points = {(r["day"], r["model"]): r["tokens"] for r in await pool.fetch(_DAILY_SQL, ids, since)}
    today_requests, today_tokens = await today_totals(pool, account_id, today)
    recent = [RequestRow(at=iso_utc(r["created_at"]), model=r["model"], surface=r["surface"], state=r["state"],
                         prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
                         billed_tokens=r["billed_tokens"])
              for r in await pool.fetch(_RECENT_SQL, ids, today)]
    return Dashboard(
        subscription=sub, meters=await meters(pool, sub.id) if sub else [],
        chart=chart.build(points, today.date(), CHART_DAYS),
        today_requests=today_requests, today_tokens=today_tokens, recent=recent,
        extras=await _extras(pool, account_id))


class PlanRow(msgspec.Struct, frozen=True):
    id: str
    name: str
    window_tokens: int
    weekly_tokens: int
    max_concurrent: int | None
    monthly_price_cents: int
    models: list[str]


async def plans(pool: asyncpg.Pool, account_id: int) -> list[PlanRow]:
    """The plans on sale, and the account's own even if it was retired since."""
    rows = await pool.fetch(
        "SELECT id, name, window_tokens, weekly_tokens, max_concurrent, monthly_price_cents, models FROM plans p"
        " WHERE p.retired_at IS NULL OR EXISTS (SELECT 1 FROM subscriptions s WHERE s.account_id = $1"
        " AND s.plan_id = p.id AND s.status <> 'canceled') ORDER BY monthly_price_cents, id", account_id)
    return [PlanRow(**{**dict(r), "models": list(r["models"])}) for r in rows]
