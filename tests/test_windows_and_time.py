"""Windows and time: the weekly window in exact weeks whatever the session's TimeZone (and the
upgrade of windows stored otherwise), the refusal's reset when both windows are full, the views'
weekly reset and hours, and a rollup that leaves the open windows' rows alone
(migrations/0050, service/usage.py, service/db.py, `codeplan rollup`)."""
from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import uuid
import zoneinfo

import asyncpg
import httpx
import pytest

from bridge.ports import Reservation
from service import db, usage
from service.ledger import Ledger, Usage

from .conftest import (CODEPLAN, base_env, database_before, new_plan, new_user, query, start_bridge,
                       wait_settled)

UTC = dt.timezone.utc
WEEK = dt.timedelta(weeks=1)
ZONES = ("Australia/Sydney", "America/New_York", "Europe/Berlin")


async def _sub(url: str, window: int, weekly: int) -> tuple[int, int]:
    plan = new_plan(url, window=window, weekly=weekly)
    new_user(url, plan)
    row = (await query(url, "SELECT s.id, k.id AS key FROM subscriptions s JOIN api_keys k"
                            " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan))[0]
    return row["id"], row["key"]


def _ask(sub: int, key: int, n: int) -> Reservation:
    return Reservation(uuid.uuid4(), sub, key, "chat", "glm-4.6", 1, n, n)


def _zone_that_changed(now: dt.datetime, within: dt.timedelta) -> tuple[str, int]:
    """A zone with DST and a number of weeks n such that, for a subscription started n weeks
    before `now` plus `within`, the zone's UTC offset at the start differs from its offset at the
    current week's start: n - 1 calendar weeks there are not (n - 1) * 168 hours."""
    for weeks in range(2, 40):
        started = now - weeks * WEEK + within
        for name in ZONES:
            zone = zoneinfo.ZoneInfo(name)
            if started.astimezone(zone).utcoffset() != (started + (weeks - 1) * WEEK).astimezone(zone).utcoffset():
                return name, weeks
    pytest.skip("no zone changed its clocks in the last 40 weeks")


async def _pool_in(url: str, zone: str) -> asyncpg.Pool:
    """A pool whose sessions are in `zone`: another process's, an older version's, psql's (the
    service's own pool pins UTC, service/db.py); the SQL must not depend on it."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2, server_settings={"timezone": zone})
    assert await pool.fetchval("SHOW timezone") == zone
    return pool


async def _weeks(url: str, sub: int) -> list[asyncpg.Record]:
    return await query(url, "SELECT id, starts_at, ends_at, posted, held, allowance FROM quota_windows"
                            " WHERE subscription_id = $1 AND kind = 'week' ORDER BY id", sub)


# ---- 1. the weekly window in exact weeks -------------------------------------------------------

async def test_weekly_window_is_exact_weeks_in_a_dst_session_time_zone(fresh_database):
    """Was: admission added the weeks since the start as `interval '7 days'`, calendar days in the
    session's TimeZone: after a clock change the window started and ended an hour off (a request
    charged to a window that had ended, the views showing the week empty)."""
    url = fresh_database
    sub, key = await _sub(url, window=10_000, weekly=50_000)
    now = (await query(url, "SELECT now() AS n"))[0]["n"]
    zone, weeks = _zone_that_changed(now, dt.timedelta(minutes=30))
    started = now - weeks * WEEK + dt.timedelta(minutes=30)
    await query(url, "UPDATE subscriptions SET started_at = $2 WHERE id = $1", sub, started)
    pool = await _pool_in(url, zone)
    try:
        r = _ask(sub, key, 5_000)
        assert (await Ledger(pool, lease_seconds=60).admit(r)).admitted
        week = await pool.fetchrow("SELECT q.starts_at, q.ends_at FROM usage_ledger l"
                                   " JOIN quota_windows q ON q.id = l.week_window_id WHERE l.id = $1", r.entry_id)
        # opened 1 week - 30 minutes ago, ends in 30 minutes, whatever the zone says
        assert (week["starts_at"], week["ends_at"]) == (started + (weeks - 1) * WEEK, started + weeks * WEEK), zone
        _, states = await usage.current_windows(pool, sub)
        shown = {w.kind: w for w in states}["week"]
        assert (shown.reserved, shown.ends_at) == (5_000, started + weeks * WEEK)
    finally:
        await pool.close()


async def test_weekly_allowance_is_one_whatever_the_session_time_zone(fresh_database):
    """Was: two sessions in different TimeZones (two processes, or one before and after the
    server's TimeZone changed) computed two anchors for one week, and the second opened a second
    weekly window, with a whole new allowance, beside the first, full, one."""
    url = fresh_database
    sub, key = await _sub(url, window=10_000, weekly=10_000)
    now = (await query(url, "SELECT now() AS n"))[0]["n"]
    zone, weeks = _zone_that_changed(now, dt.timedelta(hours=3))
    await query(url, "UPDATE subscriptions SET started_at = $2 WHERE id = $1",
                sub, now - weeks * WEEK + dt.timedelta(hours=3))
    utc = await _pool_in(url, "UTC")
    try:
        ledger = Ledger(utc, lease_seconds=60)
        r = _ask(sub, key, 9_000)
        assert (await ledger.admit(r)).admitted
        await ledger.post(r.entry_id, Usage(prompt_tokens=9_000), estimated=False, reason="t")
        # the 5-hour window closes (five hours pass); the week is 9,000 of 10,000 used
        await query(url, "UPDATE quota_windows SET starts_at = starts_at - interval '5 hours',"
                         " ends_at = now() - interval '1 second' WHERE kind = '5h'")
        assert (await ledger.admit(_ask(sub, key, 9_000))).outcome == "window_full"
    finally:
        await utc.close()
    pool = await _pool_in(url, zone)
    try:
        other = await Ledger(pool, lease_seconds=60).admit(_ask(sub, key, 9_000))
        assert (other.outcome, other.window_kind) == ("window_full", "week"), zone
        assert len(await _weeks(url, sub)) == 1
    finally:
        await pool.close()


async def _database_before_0050(pg_url: str, tmp_path) -> str:
    """A new database migrated up to 0049 (the old weekly arithmetic), with a plan 'wk' of
    10,000 credits a window and a week."""
    url = await database_before(pg_url, tmp_path, "0050")
    await query(url, "INSERT INTO plans (id, name, window_tokens, weekly_tokens, cached_weight,"
                     " monthly_price_cents, models) VALUES ('wk', 'wk', 10000, 10000, 0.2, 0,"
                     " ARRAY['glm-4.6', 'glm-4.5', 'glm-4.5-air'])")
    return url


async def test_weekly_windows_stored_off_are_reanchored_by_the_upgrade(pg_url, tmp_path):
    """The upgrade (migrations/0050): windows the old arithmetic stored an hour off, and a week
    that already has two windows (one per zone), each become the week's one exact window, its
    figures and entries (pending ones too) kept; admission then opens no other for that week."""
    url = await _database_before_0050(pg_url, tmp_path)
    twice, once = await _sub_on(url, "wk"), await _sub_on(url, "wk")
    keys = dict([twice, once])
    twice, once = twice[0], once[0]
    now = (await query(url, "SELECT now() AS n"))[0]["n"]
    zone, weeks = _zone_that_changed(now, dt.timedelta(hours=3))
    started = now - weeks * WEEK + dt.timedelta(hours=3)
    exact = started + (weeks - 1) * WEEK
    await query(url, "UPDATE subscriptions SET started_at = $1", started)

    # the old admission: `twice` in UTC (its exact window, 6,000 posted), then in the zone (a
    # second window, whose fresh allowance admits 5,000 more: 5,000 held, the entry pending);
    # `once` in the zone only (a window off)
    utc, local = await _pool_in(url, "UTC"), await _pool_in(url, zone)
    try:
        first = _ask(twice, keys[twice], 6_000)
        assert (await Ledger(utc, lease_seconds=600).admit(first)).admitted
        await Ledger(utc, lease_seconds=600).post(first.entry_id, Usage(prompt_tokens=6_000),
                                                  estimated=False, reason="t")
        await query(url, "UPDATE quota_windows SET starts_at = starts_at - interval '5 hours',"
                         " ends_at = now() - interval '1 second' WHERE kind = '5h'")
        pending = _ask(twice, keys[twice], 5_000)
        assert (await Ledger(local, lease_seconds=600).admit(pending)).admitted  # the old bug
        lone = _ask(once, keys[once], 1_000)
        assert (await Ledger(local, lease_seconds=600).admit(lone)).admitted
    finally:
        await utc.close()
        await local.close()
    stored = {sub: await _weeks(url, sub) for sub in (twice, once)}
    assert len(stored[twice]) == 2 and stored[once][0]["starts_at"] != exact, (zone, stored)

    await db.migrate(url)

    [merged] = await _weeks(url, twice)
    assert (merged["id"], merged["starts_at"], merged["ends_at"]) == (stored[twice][0]["id"], exact, exact + WEEK)
    assert (merged["posted"], merged["held"]) == (6_000, 5_000)
    assert {r["week_window_id"] for r in await query(
        url, "SELECT week_window_id FROM usage_ledger WHERE subscription_id = $1", twice)} == {merged["id"]}
    [anchored] = await _weeks(url, once)
    assert (anchored["id"], anchored["starts_at"], anchored["ends_at"]) == (stored[once][0]["id"], exact, exact + WEEK)

    for session_zone in ("UTC", zone):
        pool = await _pool_in(url, session_zone)
        try:
            ledger = Ledger(pool, lease_seconds=60)
            if session_zone == "UTC":  # the pending entry settles against the merged window
                await ledger.post(pending.entry_id, Usage(prompt_tokens=5_000), estimated=False, reason="t")
            refused = await ledger.admit(_ask(twice, keys[twice], 2_000))
            assert (refused.outcome, refused.window_kind, refused.resets_at) == ("window_full", "week", exact + WEEK)
            again = _ask(once, keys[once], 1_000)
            assert (await ledger.admit(again)).admitted
            [charged] = await query(url, "SELECT week_window_id FROM usage_ledger WHERE id = $1", again.entry_id)
            assert charged["week_window_id"] == anchored["id"]
        finally:
            await pool.close()
    assert [len(await _weeks(url, sub)) for sub in (twice, once)] == [1, 1]
    # what was spent in the week stays spent: 11,000 of 10,000 (the old bug's overdraft)
    assert [(w["posted"], w["held"]) for w in await _weeks(url, twice)] == [(11_000, 0)]


async def _sub_on(url: str, plan: str) -> tuple[int, int]:
    """A subscription and a key on a database migrated only so far: in plain SQL of that schema
    (accounts.create_user writes what later migrations add)."""
    row = (await query(url, """
        WITH a AS (INSERT INTO accounts (email) VALUES ($1) RETURNING id),
             s AS (INSERT INTO subscriptions (account_id, plan_id, status) SELECT id, $2, 'active' FROM a
                   RETURNING id, account_id),
             k AS (INSERT INTO api_keys (account_id, prefix, secret_hash)
                   SELECT id, 'cp_old', sha256(convert_to($1, 'UTF8')) FROM a RETURNING id)
        SELECT s.id, k.id AS key FROM s, k""", f"{uuid.uuid4().hex[:10]}@example.com", plan))[0]
    return row["id"], row["key"]


async def test_a_window_an_older_process_opens_during_the_upgrade_is_one_of_the_week(pg_url, tmp_path):
    """The upgrade read the stored windows under no lock: an older process (the old function, a
    session in a zone with daylight saving) opening the week's window while 0050 ran committed it
    an hour off after the reading, and the new arithmetic then opened a second window beside it
    with a whole new allowance. The migration now waits for such a writer, then re-anchors its
    window."""
    url = await _database_before_0050(pg_url, tmp_path)
    sub, key = await _sub_on(url, "wk")
    now = (await query(url, "SELECT now() AS n"))[0]["n"]
    zone, weeks = _zone_that_changed(now, dt.timedelta(hours=3))
    started = now - weeks * WEEK + dt.timedelta(hours=3)
    exact = started + (weeks - 1) * WEEK
    await query(url, "UPDATE subscriptions SET started_at = $1", started)

    old = await _pool_in(url, zone)
    conn = await old.acquire()
    try:
        tx = conn.transaction()
        await tx.start()
        # the old process's admission (0044's function), its transaction not committed yet
        r = _ask(sub, key, 6_000)
        rows = await conn.fetch(
            "SELECT * FROM ledger_admit_batch($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],"
            " $6::integer[], $7::bigint[], $8::bigint[], $9::double precision, $10::boolean[])",
            [r.entry_id], [sub], [key], ["chat"], ["glm-4.6"], [1], [6000], [6000], 600.0, [False])
        assert rows[0]["outcome"] == "admitted"
        upgrade = asyncio.ensure_future(db.migrate(url))  # the upgrade starts meanwhile
        await asyncio.sleep(1.0)
        assert not upgrade.done()  # it waits for the writer
        await tx.commit()
        await asyncio.wait_for(upgrade, 60)
    finally:
        await old.release(conn)
        await old.close()

    stored = await _weeks(url, sub)
    assert [(w["starts_at"], w["ends_at"], w["held"]) for w in stored] == [(exact, exact + WEEK, 6000)], (zone, stored)
    utc = await _pool_in(url, "UTC")
    try:
        second = await Ledger(utc, lease_seconds=60).admit(_ask(sub, key, 6_000))
    finally:
        await utc.close()
    # one weekly window, and the week's 10,000 not given twice
    assert len(await _weeks(url, sub)) == 1 and second.outcome == "window_full"


# ---- 2. the refusal with both windows full ---------------------------------------------------

@pytest.mark.parametrize("week_ends_in, kind", [(dt.timedelta(hours=1), "5h"), (dt.timedelta(hours=6), "week")])
async def test_both_windows_full_the_refusal_names_the_one_that_frees_last(fresh_database, week_ends_in, kind):
    """Was: with both windows full, the refusal named the weekly window whenever it was full, and
    sent the client back at the weekly reset though the 5-hour window, still full then, refused
    it again. Now the window that frees last (its kind gives the code and Retry-After)."""
    url = fresh_database
    sub, key = await _sub(url, window=10_000, weekly=10_000)
    now = (await query(url, "SELECT now() AS n"))[0]["n"]
    await query(url, "UPDATE subscriptions SET started_at = $2 WHERE id = $1", sub, now - WEEK + week_ends_in)
    pool = await db.create_pool(url, size=2)
    try:
        ledger = Ledger(pool, lease_seconds=60)
        r = _ask(sub, key, 9_000)
        assert (await ledger.admit(r)).admitted
        await ledger.post(r.entry_id, Usage(prompt_tokens=9_000), estimated=False, reason="t")
        refused = await ledger.admit(_ask(sub, key, 4_000))
        ends = {w["kind"]: w["ends_at"] for w in await query(url, "SELECT kind, ends_at FROM quota_windows")}
        assert (refused.outcome, refused.window_kind) == ("window_full", kind)
        assert refused.resets_at == max(ends.values()) == ends[kind]
    finally:
        await pool.close()


# ---- 3. Z.ai's hourly chart in UTC hours, and the pool's sessions in UTC ----------------------

async def test_zai_hours_are_utc_hours_in_a_half_hour_session_time_zone(fresh_database):
    """Was: Z.ai's model-usage chart bucketed hours with date_trunc in the session's TimeZone and
    looked them up by UTC hour: in a half-hour zone (Asia/Kolkata) every hour showed 0."""
    url = fresh_database
    sub, key = await _sub(url, window=100_000, weekly=500_000)
    pool = await _pool_in(url, "Asia/Kolkata")
    try:
        ledger = Ledger(pool, lease_seconds=60)
        r = _ask(sub, key, 100)
        assert (await ledger.admit(r)).admitted
        await ledger.post(r.entry_id, Usage(prompt_tokens=100), estimated=False, reason="t")
        created = (await query(url, "SELECT created_at FROM usage_ledger"))[0]["created_at"]
        hour = created.replace(minute=0, second=0, microsecond=0)
        rows = await pool.fetch(usage._HOURLY_SQL, sub, hour - dt.timedelta(hours=1), hour + dt.timedelta(hours=2))
        assert [(row["hour"], row["calls"]) for row in rows] == [(hour, 1)]
    finally:
        await pool.close()


def test_zai_hourly_usage_in_a_half_hour_server_time_zone(fresh_database, pg_url, simulator):
    """The whole path, the database's TimeZone Asia/Kolkata (an Indian host's default): the hourly
    chart counts the call its totals count."""
    url = fresh_database
    name = url.partition("?")[0].rsplit("/", 1)[1]
    asyncio.run(query(pg_url, f"ALTER DATABASE {name} SET timezone = 'Asia/Kolkata'"))
    plan = new_plan(url, window=1_000_000, weekly=5_000_000)
    key = new_user(url, plan)
    server = start_bridge(url, simulator.url + "/api/coding/paas/v4")
    try:
        reply = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                           json={"model": "glm-4.6", "messages": [{"role": "user", "content": "hello"}]},
                           timeout=30)
        assert reply.status_code == 200, reply.text
        wait_settled(url)
        data = httpx.get(server.url + "/api/monitor/usage/model-usage",
                         headers={"authorization": key}, timeout=10).json()["data"]
        assert data["totalUsage"]["totalModelCallCount"] == sum(data["modelCallCount"]) == 1
        assert sum(data["tokensUsage"]) == data["totalUsage"]["totalTokensUsage"]
    finally:
        server.stop()


async def test_the_pool_sessions_are_utc_whatever_the_server_time_zone(fresh_database, pg_url):
    """The service's sessions are pinned to UTC (service/db.py): the database's own TimeZone, a
    DST or half-hour zone, changes nothing in what the service computes or renders."""
    url = fresh_database
    name = url.partition("?")[0].rsplit("/", 1)[1]
    await query(pg_url, f"ALTER DATABASE {name} SET timezone = 'Asia/Kolkata'")
    assert (await query(url, "SHOW timezone"))[0]["TimeZone"] == "Asia/Kolkata"
    pool = await db.create_pool(url, size=2)
    try:
        assert await pool.fetchval("SHOW timezone") == "UTC"
    finally:
        await pool.close()


# ---- 4. the weekly reset before the week's first request --------------------------------------

async def test_weekly_reset_shown_before_the_first_request_of_the_week(fresh_database):
    """Was: once the week with usage ended, and before the next request opened the new week's
    window, /v1/usage, the web pages, live usage and Z.ai's nextResetTime showed the weekly window
    with no reset at all, though the start anchors it. Now its bounds, the ones admission opens."""
    url = fresh_database
    sub, key = await _sub(url, 10_000, 50_000)
    now = (await query(url, "SELECT now() AS n"))[0]["n"]
    started = now - dt.timedelta(days=8)
    await query(url, "UPDATE subscriptions SET started_at = $2 WHERE id = $1", sub, started)
    pool = await db.create_pool(url, size=2)
    try:
        ledger = Ledger(pool, lease_seconds=60)
        r = _ask(sub, key, 100)
        assert (await ledger.admit(r)).admitted
        await ledger.post(r.entry_id, Usage(prompt_tokens=100), estimated=False, reason="t")
        # a week passes: the window the request fell in ends
        await query(url, "UPDATE quota_windows SET starts_at = starts_at - interval '168 hours',"
                         " ends_at = ends_at - interval '168 hours'")
        started -= WEEK
        await query(url, "UPDATE subscriptions SET started_at = $2 WHERE id = $1", sub, started)
        _, states = await usage.current_windows(pool, sub)
        week = {w.kind: w for w in states}["week"]
        assert (week.used, week.reserved) == (0, 0)
        assert (week.starts_at, week.ends_at) == (started + 2 * WEEK, started + 3 * WEEK)
        # the window the next request opens is the one shown
        r = _ask(sub, key, 100)
        assert (await ledger.admit(r)).admitted
        opened = (await query(url, "SELECT q.starts_at, q.ends_at FROM usage_ledger l JOIN quota_windows q"
                                   " ON q.id = l.week_window_id WHERE l.id = $1", r.entry_id))[0]
        assert (opened["starts_at"], opened["ends_at"]) == (week.starts_at, week.ends_at)
    finally:
        await pool.close()


# ---- 5. a rollup leaves the open windows' rows -------------------------------------------------

def _cli(database: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CODEPLAN + list(args), env=base_env(CODEPLAN_DATABASE_URL=database),
                          capture_output=True, text=True, timeout=60)


async def test_rollup_command_leaves_the_rows_of_open_windows(fresh_database):
    """Was: `codeplan rollup --older-than-days 0..6` moved rows of windows still open into
    usage_daily, and those windows' `tokens` (/v1/usage, the web pages, Z.ai's TOKENS_LIMIT
    currentValue), counted from their rows, dropped to 0. Now fewer than 8 days (7 days and 5
    hours: a weekly window and a 5-hour one begun at its end) is refused, in one line."""
    url = fresh_database
    sub, key = await _sub(url, 10_000, 50_000)
    pool = await db.create_pool(url, size=2)
    try:
        ledger = Ledger(pool, lease_seconds=60)
        r = Reservation(uuid.uuid4(), sub, key, "chat", "glm-4.6", 100, 1_000, 1_000)
        assert (await ledger.admit(r)).admitted
        await ledger.post(r.entry_id, Usage(prompt_tokens=100, completion_tokens=200), estimated=False, reason="t")
        _, before = await usage.current_windows(pool, sub)
        assert [w.tokens for w in before] == [300, 300]
        for days in ("0", "6", "7", "99999999999"):
            done = _cli(url, "rollup", "--older-than-days", days)
            assert done.returncode == 2, (days, done.stdout, done.stderr)
            [line] = done.stderr.strip().splitlines()
            assert line.startswith("codeplan: rollup: --older-than-days must be from 8 to 36500"), line
        done = _cli(url, "rollup", "--older-than-days", "8")
        assert (done.returncode, done.stdout.strip()) == (0, "rolled up 0 ledger row(s)"), done.stderr
        _, after = await usage.current_windows(pool, sub)
        assert [(w.used, w.tokens) for w in after] == [(w.used, w.tokens) for w in before]
        # a row from before the cut-off goes, as it always did
        await query(url, "UPDATE usage_ledger SET created_at = now() - interval '9 days'")
        done = _cli(url, "rollup", "--older-than-days", "8")
        assert (done.returncode, done.stdout.strip()) == (0, "rolled up 1 ledger row(s)"), done.stderr
    finally:
        await pool.close()
