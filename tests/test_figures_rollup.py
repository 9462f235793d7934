"""A rollup and the figures drawn from the ledger: a rollup moves whole UTC days (migrations/0054,
`codeplan rollup`), the per-model totals take a rolled-up day only when the whole day lies in the
range (service/usage.py `totals`), and Z.ai's model-usage totals are the sums of the hours it
shows (rolled-up days have no hours: they are in neither)."""
from __future__ import annotations

import datetime as dt
import subprocess
import uuid

import asyncpg
import httpx

from bridge.ports import Reservation
from service import db
from service.ledger import Ledger, Usage
from service.usage import totals

from .conftest import CODEPLAN, base_env, new_plan, new_user, query, run, wait_settled

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
CHAT = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}


def _day_ago(days: int) -> dt.datetime:
    """The UTC midnight that began the day `days` days ago."""
    return dt.datetime.combine((dt.datetime.now(UTC) - dt.timedelta(days=days)).date(), dt.time(0), tzinfo=UTC)


async def _rows_at(url: str, moments: list[dt.datetime]) -> tuple[int, list[uuid.UUID]]:
    """A new subscription with one posted row (10 prompt + 5 completion tokens) created at each
    moment: its id and the rows' ids."""
    plan = new_plan(url, window=100_000, weekly=500_000)
    new_user(url, plan)
    [ids] = await query(url, "SELECT s.id AS sub, k.id AS key FROM subscriptions s JOIN api_keys k"
                             " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan)
    pool = await db.create_pool(url, size=2)
    entries = []
    try:
        ledger = Ledger(pool, lease_seconds=60)
        for moment in moments:
            entry = uuid.uuid4()
            assert (await ledger.admit(Reservation(entry, ids["sub"], ids["key"], "chat", "glm-4.6", 10, 100,
                                                   100))).admitted
            await ledger.post(entry, Usage(prompt_tokens=10, completion_tokens=5), estimated=False, reason="t")
            await query(url, "UPDATE usage_ledger SET created_at = $2 WHERE id = $1", entry, moment)
            entries.append(entry)
    finally:
        await pool.close()
    return ids["sub"], entries


# ---- the cut -----------------------------------------------------------------------------------

async def test_ledger_rollup_cuts_at_the_utc_midnight_whatever_the_session_time_zone(fresh_database):
    """Was: `ledger_rollup(p_before)` cut at `p_before` itself: a cut at 12:00 split the day, its
    morning in usage_daily and its afternoon in the ledger, and no range through that day could be
    answered right. Now the cut is the UTC midnight at or before `p_before`, in a session whose
    TimeZone is Asia/Kolkata (+05:30) too, where the session's own midnight is 18:30 UTC."""
    url = fresh_database
    day = _day_ago(10)
    sub, entries = await _rows_at(url, [day + 2 * HOUR, day + 20 * HOUR, day + 27 * HOUR])
    conn = await asyncpg.connect(url, server_settings={"timezone": "Asia/Kolkata"})
    try:
        # at 12:00 of the day: its midnight, before all three
        assert await conn.fetchval("SELECT ledger_rollup($1)", day + 12 * HOUR) == 0
        # at 12:00 of the next day: the next midnight, after the first day's two (18:30 UTC, the
        # midnight in Kolkata, would leave the one of 20:00 behind)
        assert await conn.fetchval("SELECT ledger_rollup($1)", day + 36 * HOUR) == 2
    finally:
        await conn.close()
    daily = await query(url, "SELECT day, requests, billed_tokens FROM usage_daily WHERE subscription_id = $1", sub)
    assert [(d["day"], d["requests"]) for d in daily] == [(day.date(), 2)]
    left = await query(url, "SELECT id FROM usage_ledger WHERE subscription_id = $1", sub)
    assert [r["id"] for r in left] == [entries[2]]


def test_rollup_command_moves_whole_days_only(fresh_database):
    """`codeplan rollup --older-than-days 9` at any time of day: rows of the day 9 days ago stay
    (its first moment included), the row a microsecond before its midnight goes."""
    url = fresh_database
    midnight = _day_ago(9)
    sub, entries = run(_rows_at(url, [midnight - dt.timedelta(microseconds=1), midnight,
                                      max(midnight, dt.datetime.now(UTC) - dt.timedelta(days=9, seconds=1))]))
    done = subprocess.run(CODEPLAN + ["rollup", "--older-than-days", "9"], env=base_env(CODEPLAN_DATABASE_URL=url),
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "rolled up 1 ledger row(s)"), done.stderr
    left = run(query(url, "SELECT id FROM usage_ledger WHERE subscription_id = $1 ORDER BY created_at", sub))
    assert {r["id"] for r in left} == set(entries[1:])


# ---- the totals ------------------------------------------------------------------------------

async def test_totals_take_a_rolled_up_day_only_when_the_range_holds_all_of_it(fresh_database):
    """Was: a rolled-up day was counted whole when the range's start fell in it (`day >=
    start::date`): a range from 10:00 counted the row of 02:00. Rows at D 02:00 and D 14:00 rolled
    up, one at D+1 03:00 still in the ledger."""
    url = fresh_database
    day = _day_ago(10)
    sub, _ = await _rows_at(url, [day + 2 * HOUR, day + 14 * HOUR, day + 27 * HOUR])
    pool = await db.create_pool(url, size=2)
    try:
        assert await Ledger(pool, lease_seconds=60).rollup(day + 24 * HOUR) == 2

        async def requests(start: dt.datetime, end: dt.datetime) -> int:
            found = (await totals(pool, sub, start, end)).get("glm-4.6")
            return found.requests if found else 0
        assert await requests(day + 10 * HOUR, day + 48 * HOUR) == 1  # D cut into: not counted
        assert await requests(day, day + 24 * HOUR) == 2  # D whole
        assert await requests(day - 24 * HOUR, day + 13 * HOUR) == 0  # D cut into at its end
        assert await requests(day, day + 36 * HOUR) == 3  # D whole, and the ledger's row of D+1
        assert await requests(day + HOUR, day + 23 * HOUR) == 0
    finally:
        await pool.close()


# ---- Z.ai's model usage ------------------------------------------------------------------------

def _fmt(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _figures(server, key: str, start: dt.datetime, end: dt.datetime) -> tuple[int, int, int, int]:
    """(total calls, total credits, sum of the hours' calls, sum of the hours' credits)."""
    reply = httpx.get(server.url + "/api/monitor/usage/model-usage", headers={"authorization": key},
                      params={"startTime": _fmt(start), "endTime": _fmt(end)}, timeout=10).json()
    assert reply["success"], reply
    data = reply["data"]
    total = data["totalUsage"]
    assert sum(m["totalTokens"] for m in total["modelSummaryList"]) == total["totalTokensUsage"]
    return (total["totalModelCallCount"], total["totalTokensUsage"], sum(data["modelCallCount"]),
            sum(data["tokensUsage"]))


def test_zai_model_usage_totals_are_its_hours_across_rollups(bridge, database):
    """Three real requests, dated D 02:00, D 14:00 and D+1 03:00 (10 days ago). Was: a rollup cut
    at 12:00 moved the row of 02:00 into usage_daily, and the figures of a range changed (a day's
    rollup counted whole when the range began in it, never when it ended in it), and the totals
    counted rolled-up days the hours beside them never show. Now a cut at 12:00 moves nothing (the
    cut is the day's midnight); once the day is rolled up it is in neither the hours nor the
    totals, and the totals are the sums of the hours, for every range."""
    plan = new_plan(database, window=10_000_000, weekly=50_000_000)
    key = new_user(database, plan)
    for _ in range(3):
        r = httpx.post(bridge.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json=CHAT, timeout=30)
        assert r.status_code == 200, r.text
    wait_settled(database)
    sub = run(query(database, "SELECT s.id FROM subscriptions s JOIN api_keys k ON k.account_id = s.account_id"
                              " WHERE k.prefix = $1", key[:10]))[0]["id"]
    rows = run(query(database, "SELECT id, billed_tokens FROM usage_ledger WHERE subscription_id = $1"
                               " ORDER BY created_at", sub))
    day = _day_ago(10)
    for row, moment in zip(rows, [day + 2 * HOUR, day + 14 * HOUR, day + 27 * HOUR]):
        run(query(database, "UPDATE usage_ledger SET created_at = $2 WHERE id = $1", row["id"], moment))
    billed = [r["billed_tokens"] for r in rows]
    second = dt.timedelta(seconds=1)
    ranges = {  # endTime is the range's last second
        "starts_mid": (day + 10 * HOUR, day + 34 * HOUR - second),
        "ends_mid": (day, day + 13 * HOUR - second),
        "whole_day": (day, day + 24 * HOUR - second),
        "two_days": (day, day + 48 * HOUR - second),
    }
    ledger_truth = {"starts_mid": [1, 2], "ends_mid": [0], "whole_day": [0, 1], "two_days": [0, 1, 2]}

    def expected(kept: set[int]) -> dict[str, tuple[int, int, int, int]]:
        out = {}
        for name, rows_in in ledger_truth.items():
            calls = sum(1 for i in rows_in if i in kept)
            credits = sum(billed[i] for i in rows_in if i in kept)
            out[name] = (calls, credits, calls, credits)
        return out

    def figures() -> dict[str, tuple[int, int, int, int]]:
        return {name: _figures(bridge, key, *r) for name, r in ranges.items()}
    assert figures() == expected({0, 1, 2})
    # `codeplan rollup` run at 12:00 of D would have asked for this cut
    run(query(database, "SELECT ledger_rollup($1)", day + 12 * HOUR))
    assert figures() == expected({0, 1, 2})
    # the day D rolled up: its two rows leave the hours and the totals alike
    run(query(database, "SELECT ledger_rollup($1)", day + 24 * HOUR))
    assert run(query(database, "SELECT count(*) AS n FROM usage_ledger WHERE subscription_id = $1", sub))[0]["n"] == 1
    assert figures() == expected({2})
