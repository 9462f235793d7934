"""The quota API: `GET /v1/usage`, and Z.ai's own monitor endpoints so quota HUDs work unchanged.

Window figures come from `quota_windows` (kept by the ledger's transitions); per-model totals
from the settled ledger rows of the period plus the per-day rollups (usage_daily, whole UTC days:
migrations/0054) of the days that lie wholly inside it.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Annotated

import asyncpg
import msgspec
from litestar import Request, Response, get
from litestar.openapi import ResponseSpec
from litestar.params import QueryParameter

from bridge.app import api_key
from bridge.journey import iso_utc
from bridge.ports import Principal

from . import statusline
from .credits import ModelCredits, plan_credits
from .problems import problem, problem_responses
from .strict_input import strict_input
from .throttle import GuardedAuthenticator

UTC = dt.timezone.utc


class Window(msgspec.Struct):
    """A window's figures are credits (a credit is a token at the default coefficients);
    `tokens` beside them counts the prompt and completion tokens settled in it, exactly."""
    kind: str  # "5h" | "week"
    allowance: int
    used: int
    reserved: int
    remaining: int
    started_at: str | None
    # null when no 5-hour window is open: the next request opens one
    resets_at: str | None
    unit: str = "credits"
    tokens: int = 0


class ModelTotals(msgspec.Struct):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    billed_tokens: int = 0
    credits: int = 0  # the same as billed_tokens, under its name


class Plan(msgspec.Struct):
    id: str
    name: str
    cached_weight: float
    max_concurrent: int | None
    # per model: credits per input, cached input and output token, and the peak multiplier
    credits: dict[str, ModelCredits] = {}


class EstimateQuality(msgspec.Struct):
    samples: int
    ratio: float
    mean_abs_error: float


class UsageReport(msgspec.Struct):
    plan: Plan
    windows: list[Window]
    today: dict[str, ModelTotals]
    week: dict[str, ModelTotals]
    estimates: dict[str, EstimateQuality]


class _WindowState(msgspec.Struct, frozen=True):
    kind: str
    allowance: int
    used: int
    reserved: int
    starts_at: dt.datetime | None  # None: no window open; the next request opens one
    ends_at: dt.datetime | None
    tokens: int = 0  # prompt + completion tokens settled in it

    @property
    def remaining(self) -> int:
        # What the pending requests are expected to leave, as every view shows them (used +
        # reserved, remaining: they add up to the allowance). Admission counts their worst case
        # (held), so while requests are in flight a request that fits this may still be refused.
        return max(0, self.allowance - self.used - self.reserved)


_WINDOWS_SQL = """
SELECT DISTINCT ON (w.kind) w.kind, w.allowance, w.reserved, w.posted, w.starts_at, w.ends_at,
       -- widened before adding: two int4 counts can pass int4's range in one row
       (SELECT coalesce(sum(l.prompt_tokens::bigint + l.completion_tokens), 0)::bigint FROM usage_ledger l
         WHERE l.subscription_id = w.subscription_id AND l.created_at >= w.starts_at
           AND (l.window_id = w.id OR l.week_window_id = w.id)
           AND l.state IN ('posted', 'expired')) AS tokens
  FROM quota_windows w
 WHERE w.subscription_id = $1 AND w.ends_at > now() AND w.kind IN ('5h', 'week')
 ORDER BY w.kind, w.starts_at DESC
"""

_PLAN_SQL = """
SELECT p.id, p.name, p.window_tokens, p.weekly_tokens, p.cached_weight, p.max_concurrent, s.started_at,
       now() AS now
  FROM subscriptions s JOIN plans p ON p.id = s.plan_id WHERE s.id = $1
"""

WEEK = dt.timedelta(seconds=604_800)


def current_week(started_at: dt.datetime, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The weekly window open at `now`, as admission anchors it (migrations/0050): whole weeks of
    604,800 seconds since the subscription's start, whatever any time zone says."""
    start = started_at + WEEK * ((now - started_at) // WEEK)
    return start, start + WEEK

# Settled rows of the period, plus the rolled-up days that lie wholly inside it: a rolled-up day
# has no times left, so one the period only cuts into is not counted (neither whole nor in part;
# a rollup takes whole UTC days, migrations/0054, so the ledger holds none of its rows either).
_TOTALS_SQL = """
SELECT model, sum(requests)::bigint AS requests, sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens, sum(cached_tokens)::bigint AS cached_tokens,
       sum(reasoning_tokens)::bigint AS reasoning_tokens, sum(billed_tokens)::bigint AS billed_tokens
  FROM (
    SELECT model, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens, sum(cached_tokens) AS cached_tokens,
           sum(reasoning_tokens) AS reasoning_tokens, sum(billed_tokens) AS billed_tokens
      FROM usage_ledger
     WHERE subscription_id = ANY($1::bigint[]) AND created_at >= $2 AND created_at < $3
       AND state IN ('posted', 'expired')
     GROUP BY model
    UNION ALL
    SELECT model, requests, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, billed_tokens
      FROM usage_daily
     WHERE subscription_id = ANY($1::bigint[])
       AND day::timestamp AT TIME ZONE 'UTC' >= $2 AND (day + 1)::timestamp AT TIME ZONE 'UTC' <= $3
  ) t
 GROUP BY model ORDER BY model
"""


async def _totals(pool: asyncpg.Pool, subscription_ids: Sequence[int], start: dt.datetime,
                  end: dt.datetime) -> dict[str, ModelTotals]:
    rows = await pool.fetch(_TOTALS_SQL, list(subscription_ids), start, end)
    return {r["model"]: ModelTotals(**{k: r[k] for k in ModelTotals.__struct_fields__ if k != "credits"},
                                    credits=r["billed_tokens"]) for r in rows}


async def totals(pool: asyncpg.Pool, subscription_id: int, start: dt.datetime,
                 end: dt.datetime) -> dict[str, ModelTotals]:
    """One subscription's settled usage per model in [start, end)."""
    return await _totals(pool, [subscription_id], start, end)


_ACCOUNT_SUBSCRIPTIONS_SQL = "SELECT id FROM subscriptions WHERE account_id = $1"


async def current_windows(pool: asyncpg.Pool, subscription_id: int) -> tuple[asyncpg.Record, list[_WindowState]]:
    """The plan, and its 5-hour and weekly windows as they stand now. A week without a row yet
    (no request since it began) is shown empty with its bounds: the start anchors it, and its
    reset is known before the first request opens it."""
    plan = await pool.fetchrow(_PLAN_SQL, subscription_id)
    open_windows = {r["kind"]: r for r in await pool.fetch(_WINDOWS_SQL, subscription_id)}
    windows = []
    for kind, allowance in (("5h", plan["window_tokens"]), ("week", plan["weekly_tokens"])):
        row = open_windows.get(kind)
        if row is not None:
            windows.append(_WindowState(kind, row["allowance"], row["posted"], row["reserved"],
                                        row["starts_at"], row["ends_at"], row["tokens"]))
        elif kind == "week":
            windows.append(_WindowState(kind, allowance, 0, 0, *current_week(plan["started_at"], plan["now"])))
        else:
            windows.append(_WindowState(kind, allowance, 0, 0, None, None))
    return plan, windows


async def report(pool: asyncpg.Pool, principal: Principal, estimates: dict) -> UsageReport:
    plan, states = await current_windows(pool, principal.subscription_id)
    windows = [Window(kind=w.kind, allowance=w.allowance, used=w.used, reserved=w.reserved,
                      remaining=w.remaining,
                      started_at=iso_utc(w.starts_at) if w.starts_at else None,
                      resets_at=iso_utc(w.ends_at) if w.ends_at else None, tokens=w.tokens)
               for w in states]
    now = dt.datetime.now(UTC)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week_start = day_start - dt.timedelta(days=day_start.weekday())
    tomorrow = day_start + dt.timedelta(days=1)
    # today and this week are the account's, over all its subscriptions, as the dashboard and the
    # live feeds count today: a cancel and a new subscription the same day keep the morning's
    subscriptions = [r["id"] for r in await pool.fetch(_ACCOUNT_SUBSCRIPTIONS_SQL, principal.account_id)]
    return UsageReport(
        plan=Plan(id=plan["id"], name=plan["name"], cached_weight=float(plan["cached_weight"]),
                  max_concurrent=plan["max_concurrent"],
                  credits=await plan_credits(pool, plan["id"], list(principal.models))),
        windows=windows,
        today=await _totals(pool, subscriptions, day_start, tomorrow),
        week=await _totals(pool, subscriptions, week_start, tomorrow),
        estimates={m: EstimateQuality(**v) for m, v in estimates.items()})


async def _principal(request: Request) -> Principal | None:
    """The key's principal; raises service.throttle.Throttled (a 429 in the caller's shape,
    service/app.py) when this address has tried too many unknown keys."""
    auth: GuardedAuthenticator = request.app.state.auth
    key = api_key(request) or (request.headers.get("authorization") or "").strip()
    return await auth.authenticate(key, request.client.host if request.client else None)


def _problem_401() -> Response:
    return problem(401, "Invalid API key", "Send your Codeplan key as `Authorization: Bearer <key>`.")


@get("/v1/usage", responses=problem_responses(401, 402, 429, 503), tags=["usage"],
     summary="The key's plan and windows",
     description="Each window's allowance, used, reserved, remaining and reset (UTC ISO 8601), in "
                 "credits; per-model totals today and this week (UTC, over all the account's "
                 "subscriptions, as the live feed's `today`); the estimator's measured error.")
async def usage(request: Request) -> Response[UsageReport]:
    principal = await _principal(request)
    if principal is None:
        return _problem_401()
    if principal.subscription_id is None:
        return problem(402, "No subscription", "This account has no active subscription.")
    body = await report(request.app.state.pool, principal, request.app.state.calibration.report())
    return Response(msgspec.json.encode(body), media_type="application/json")


# ---- Z.ai monitor endpoints (glm-upstream.md §8) ----------------------------------------

class ZaiFailure(msgspec.Struct):
    """Z.ai's envelope around a failure: the outcome in `code` (HTTP 200 for the API's own
    refusals, as Z.ai answers them; the real status for an outage)."""
    code: int
    msg: str
    success: bool
    data: None = None


class ZaiLimit(msgspec.Struct, omit_defaults=True):
    """Z.ai's entry: since 2026 `CREDIT_LIMIT` with the cap (`usage`), what was used
    (`currentValue`) and what is left, in credits. `tokens` beside them: the tokens settled in
    the window. A `TOKENS_LIMIT` entry follows each, for HUDs written before credits, with the
    same percentage and the tokens as its current value."""
    type: str
    unit: int
    number: int
    percentage: int
    nextResetTime: int | None
    usage: int | None = None
    currentValue: int | None = None
    remaining: int | None = None
    tokens: int | None = None


class ZaiQuota(msgspec.Struct):
    level: str
    limits: list[ZaiLimit]


class ZaiQuotaAnswer(msgspec.Struct):
    """Z.ai's envelope: `data` is null when `success` is false (the outcome in `code`)."""
    code: int
    msg: str
    success: bool
    data: ZaiQuota | None = None


def _reset_ms(ends_at: dt.datetime | None) -> int | None:
    """A window's end as Z.ai's `nextResetTime`: milliseconds of the whole second at or after it.
    A window ends at its opening's `now()` plus its length, to the microsecond; a time shown
    before that would name a moment when a request is still refused by the window (as /v1/usage's
    `resets_at`, bridge/journey.py `iso_utc`)."""
    if ends_at is None:
        return None
    whole = ends_at.replace(microsecond=0)
    if whole < ends_at:
        whole += dt.timedelta(seconds=1)
    return int(whole.timestamp()) * 1000


def _zai(envelope: type, data: object, code: int = 200, msg: str = "Operation successful") -> Response:
    # Z.ai answers HTTP 200 and puts the outcome in the envelope; HUD plugins read `success`
    return Response(msgspec.json.encode(envelope(code=code, msg=msg, success=code == 200, data=data)),
                    media_type="application/json")


# the monitor API's outage (the database away): Z.ai's envelope with the real status
_ZAI_OUTAGE = {503: ResponseSpec(ZaiFailure, generate_examples=False,
                                 description="The database is unreachable for a moment; retry.")}


@get("/api/monitor/usage/quota/limit", responses=_ZAI_OUTAGE, tags=["z.ai monitor"],
     summary="Z.ai's quota endpoint",
     description="The 5-hour and weekly windows as Z.ai's quota HUDs read them. The key goes in "
                 "`Authorization`, with or without `Bearer`.")
async def zai_quota_limit(request: Request) -> Response[ZaiQuotaAnswer]:
    principal = await _principal(request)
    if principal is None:
        return _zai(ZaiQuotaAnswer, None, 401, "token expired or incorrect")
    if principal.subscription_id is None:
        return _zai(ZaiQuotaAnswer, None, 402, "no active subscription")
    plan, windows = await current_windows(request.app.state.pool, principal.subscription_id)
    limits, legacy = [], []
    for window in windows:
        unit, number = (3, 5) if window.kind == "5h" else (6, 1)
        used = window.used + window.reserved
        reset = _reset_ms(window.ends_at)
        # the status line's rule (100 only when nothing is left): HUDs read 100 as the limit reached
        percentage = statusline.percentage(used, window.allowance, window.remaining)
        limits.append(ZaiLimit(
            type="CREDIT_LIMIT", unit=unit, number=number, percentage=percentage,
            nextResetTime=reset, usage=window.allowance, currentValue=used, remaining=window.remaining,
            tokens=window.tokens))
        legacy.append(ZaiLimit(type="TOKENS_LIMIT", unit=unit, number=number, percentage=percentage,
                               nextResetTime=reset, currentValue=window.tokens))
    return _zai(ZaiQuotaAnswer, ZaiQuota(level=plan["id"], limits=limits + legacy))


class ZaiModelSummary(msgspec.Struct):
    modelName: str
    totalTokens: int


class ZaiTotalUsage(msgspec.Struct):
    totalModelCallCount: int
    totalTokensUsage: int
    modelSummaryList: list[ZaiModelSummary]


class ZaiModelUsage(msgspec.Struct):
    x_time: list[str]
    modelCallCount: list[int]
    tokensUsage: list[int]
    totalUsage: ZaiTotalUsage


class ZaiModelUsageAnswer(msgspec.Struct):
    """Z.ai's envelope: `data` is null when `success` is false (the outcome in `code`)."""
    code: int
    msg: str
    success: bool
    data: ZaiModelUsage | None = None


_TIME = ("yyyy-MM-dd HH:mm:ss, read as UTC, between the years 2000 and 2199; anything else is "
         "answered with code 400 in the envelope")


# Calls and credits per UTC hour and model (hours in UTC, as they are looked up: the session's
# TimeZone may be any, a half-hour one too). The hours and the totals beside them are both summed
# from these rows, so the totals are always the sum of the hours shown. Days already rolled up
# (usage_daily) have no hours, so they are in neither.
_HOURLY_SQL = """
SELECT date_trunc('hour', created_at, 'UTC') AS hour, model, count(*) AS calls,
       sum(billed_tokens)::bigint AS tokens
  FROM usage_ledger
 WHERE subscription_id = $1 AND created_at >= $2 AND created_at < $3 AND state IN ('posted', 'expired')
 GROUP BY 1, 2 ORDER BY 1, 2
"""

# the most hours one answer draws: 31 days
_MAX_HOURS = 24 * 31


# dates a usage query may name: the service did not exist before, and nothing is recorded after
_EARLIEST = dt.datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = dt.datetime(2200, 1, 1, tzinfo=UTC)


def _zai_time(value: str | None, fallback: dt.datetime) -> dt.datetime:
    """A `yyyy-MM-dd HH:mm:ss` time as UTC; ValueError when malformed or out of range."""
    if not value:
        return fallback
    moment = dt.datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    if not _EARLIEST <= moment < _LATEST:
        raise ValueError("out of range")
    return moment


# a malformed parameter is answered in the envelope with HTTP 200, as every refusal here
_ZAI_PARAMETERS = {**_ZAI_OUTAGE, 400: ResponseSpec(ZaiFailure, generate_examples=False, description=(
    "Not sent: a malformed parameter is answered with HTTP 200 and code 400 in the envelope."))}


@get("/api/monitor/usage/model-usage", responses=_ZAI_PARAMETERS, tags=["z.ai monitor"], before_request=strict_input,
     summary="Z.ai's usage endpoint",
     description="Calls and credits per UTC hour between `startTime` and `endTime` (default: the last "
                 "24 hours), and their totals per model: the totals are the sums of the hours shown. "
                 "At most 31 days of hours: a longer range is answered for its last 31 days. Days "
                 "already rolled up (`codeplan rollup`) have no hours and are not counted.")
async def zai_model_usage(
        request: Request,
        start_time: Annotated[str | None, QueryParameter(name="startTime", description=_TIME)] = None,
        end_time: Annotated[str | None, QueryParameter(name="endTime", description=_TIME)] = None,
) -> Response[ZaiModelUsageAnswer]:
    principal = await _principal(request)
    if principal is None:
        return _zai(ZaiModelUsageAnswer, None, 401, "token expired or incorrect")
    if principal.subscription_id is None:
        return _zai(ZaiModelUsageAnswer, None, 402, "no active subscription")
    now = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    try:
        # times are read as UTC (Z.ai's own are Beijing time); the official script's default
        # range is yesterday HH:00:00 to today HH:59:59
        start = _zai_time(start_time, now - dt.timedelta(days=1))
        end = _zai_time(end_time, now + dt.timedelta(hours=1)) + dt.timedelta(seconds=1)
    except ValueError:
        return _zai(ZaiModelUsageAnswer, None, 400, "startTime and endTime take the form "
                    "yyyy-MM-dd HH:mm:ss, between the years 2000 and 2199")
    if start >= end:
        return _zai(ZaiModelUsageAnswer, None, 400, "startTime must come before endTime")
    # a range longer than the hours drawn is cut to its last _MAX_HOURS hours (the latest usage
    # is what a HUD asks a long range for), and the totals are of that range too
    last_hour = (end - dt.timedelta(microseconds=1)).replace(minute=0, second=0, microsecond=0)
    first_hour = max(start.replace(minute=0, second=0, microsecond=0),
                     last_hour - dt.timedelta(hours=_MAX_HOURS - 1))
    start = max(start, first_hour)
    pool: asyncpg.Pool = request.app.state.pool
    hourly: dict[dt.datetime, list[int]] = {}
    per_model: dict[str, int] = {}
    for row in await pool.fetch(_HOURLY_SQL, principal.subscription_id, start, end):
        figures = hourly.setdefault(row["hour"], [0, 0])
        figures[0] += row["calls"]
        figures[1] += row["tokens"]
        per_model[row["model"]] = per_model.get(row["model"], 0) + row["tokens"]
    x_time, calls, tokens = [], [], []
    hour = first_hour
    while hour <= last_hour:
        hour_calls, hour_tokens = hourly.get(hour, (0, 0))
        x_time.append(hour.strftime("%Y-%m-%d %H:%M"))
        calls.append(hour_calls)
        tokens.append(hour_tokens)
        hour += dt.timedelta(hours=1)
    return _zai(ZaiModelUsageAnswer, ZaiModelUsage(
        x_time=x_time, modelCallCount=calls, tokensUsage=tokens,
        totalUsage=ZaiTotalUsage(
            totalModelCallCount=sum(calls), totalTokensUsage=sum(tokens),
            modelSummaryList=[ZaiModelSummary(modelName=m, totalTokens=t)
                              for m, t in sorted(per_model.items())])))


routes = [usage, zai_quota_limit, zai_model_usage]
