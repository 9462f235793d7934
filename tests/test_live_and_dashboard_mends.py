"""Figures that time changes reach the live sockets (a window's end, 00:00 UTC); the dashboard's
top-up and request tables in Chinese, formatted like its other figures; what the sweeper bills
counted in `codeplan_credits_total`. Real bridge subprocess, real PostgreSQL."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
import uuid

import httpx
import pytest
from urllib.parse import urlsplit

from websockets.sync.client import connect as ws_connect

from bridge.ports import Reservation
from service import db
from service.ledger import ExpiredEntry, Ledger
from service.web import dashboard, i18n, live

from .conftest import new_plan, new_user, query, run, start_bridge, wait_settled
from .test_web_browser import browser  # noqa: F401 - the browser fixture
from .web_support import Browserish

UTC = dt.timezone.utc
CHAT = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}


@pytest.fixture(scope="module")
def site(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_CACHE_TTL="0",
                          CODEPLAN_SIGNUP_PLAN="lite", CODEPLAN_SIGNUP_LIMIT="1000")
    yield server
    server.stop()


def _signed_in(site, database, lang: str = "en") -> tuple[Browserish, str, int]:
    """A new account signed in on the page, its API key, its account id."""
    client = Browserish(site.url, lang=lang)
    assert client.sign_up(f"u{uuid.uuid4().hex[:10]}@example.com").url.path == "/setup"
    client.get("/keys")
    secret = re.search(r"cp_[A-Za-z0-9_-]{30,}", client.post("/keys", {"name": "k"}).text).group(0)
    account = run(query(database, "SELECT account_id FROM api_keys WHERE prefix = $1", secret[:10]))[0]["account_id"]
    return client, secret, account


def _spend(site, secret: str, database: str) -> None:
    r = httpx.post(site.url + "/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                   json=CHAT, timeout=30)
    assert r.status_code == 200, r.text
    wait_settled(database)


# ---- live figures that time changes ------------------------------------------------------


def test_a_live_socket_is_sent_the_figures_when_its_5h_window_ends(site, database):
    """Was: a socket sent figures only after a settlement (its idle check sent nothing): once the
    5-hour window ended it kept showing the window's use, with a reset already past, until the
    next request. Now the figures come again when the window ends: used 0, no reset."""
    _, secret, account = _signed_in(site, database)
    _spend(site, secret, database)
    # the window (opened by that request) ends 3 s from now, before the socket opens: the
    # figures it is sent say so, and nothing settles afterwards
    run(query(database, "UPDATE quota_windows q SET starts_at = now() - interval '5 hours' + interval '3 seconds',"
                        " ends_at = now() + interval '3 seconds' FROM subscriptions s"
                        " WHERE s.id = q.subscription_id AND s.account_id = $1 AND q.kind = '5h'", account))
    with ws_connect(site.url.replace("http://", "ws://") + "/v1/usage/live",
                    additional_headers={"Authorization": f"Bearer {secret}"}) as socket:
        first = json.loads(socket.recv(timeout=10))
        window = first["windows"][0]
        assert window["kind"] == "5h" and window["used"] > 0 and window["resets_at"] is not None
        opened = time.monotonic()
        # within its end (3 s), the slack (1 s) and less than an idle check (15 s) besides
        pushed = json.loads(socket.recv(timeout=12))
        waited = time.monotonic() - opened
    assert pushed["type"] == "usage"
    assert (pushed["windows"][0]["used"], pushed["windows"][0]["resets_at"]) == (0, None), pushed
    assert pushed["today"] == first["today"]  # only the window changed
    assert 1.5 < waited < 8, waited
    truth = httpx.get(site.url + "/v1/usage", headers={"authorization": f"Bearer {secret}"}, timeout=10).json()
    assert truth["windows"][0]["resets_at"] is None and truth["windows"][0]["used"] == 0


def _usage(subscription_id: int, *, resets: list[str | None], at: str, requests: int = 0) -> live.LiveUsage:
    return live.LiveUsage(
        subscription_id=subscription_id, plan="lite", plan_name="Lite",
        windows=[live.LiveWindow(kind=kind, allowance=1000, used=10, reserved=0, remaining=990, resets_at=r)
                 for kind, r in zip(("5h", "week"), resets)],
        today=live.LiveToday(requests=requests, billed_tokens=10 * requests), at=at)


def test_the_next_change_of_figures_is_their_first_window_end_or_midnight_when_today_counts():
    week = "2031-03-10T09:00:00Z"
    # the earliest window end
    assert live.next_change(_usage(7, resets=["2031-03-04T15:20:00Z", week], at="2031-03-04T12:00:00Z")) == \
        dt.datetime(2031, 3, 4, 15, 20, tzinfo=UTC)
    # no 5-hour window open and nothing today: the week's end
    assert live.next_change(_usage(7, resets=[None, week], at="2031-03-04T12:00:00Z")) == \
        dt.datetime(2031, 3, 10, 9, 0, tzinfo=UTC)
    # today counts requests: 00:00 UTC after the figures were read, at the subscription's offset
    # within the spread (subscription 500 of each thousand: half of it)
    assert live.next_change(_usage(1500, resets=[None, week], at="2031-03-04T23:59:59Z", requests=3),
                            spread=30.0) == dt.datetime(2031, 3, 5, 0, 0, 15, tzinfo=UTC)
    assert live.next_change(_usage(2000, resets=["2031-03-05T02:00:00Z", week], at="2031-03-04T21:00:00Z",
                                   requests=3)) == dt.datetime(2031, 3, 5, tzinfo=UTC)
    # figures read in the day's last second say 00:00:00 (rounded up) and count that day: they
    # are read again at once (the midnight just come), not a day later
    assert live.next_change(_usage(2000, resets=[None, week], at="2031-03-05T00:00:00Z", requests=3)) == \
        dt.datetime(2031, 3, 5, tzinfo=UTC)
    assert live.next_change(_usage(2000, resets=[None, week], at="2031-03-05T00:00:01Z", requests=3)) == \
        dt.datetime(2031, 3, 6, tzinfo=UTC)
    # neither: only a settlement changes them
    assert live.next_change(_usage(7, resets=[None, None], at="2031-03-04T12:00:00Z")) is None


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class _CountingReads:
    def __init__(self, value) -> None:
        self.value = value
        self.reads: list[int] = []

    async def __call__(self, _pool, subscription_id: int) -> live.LiveUsage:
        self.reads.append(subscription_id)
        return self.value(subscription_id)


async def _next(watcher: live.Watcher, timeout: float) -> live.LiveUsage | None:
    return await asyncio.wait_for(watcher.next(), timeout)


async def test_the_hub_reads_a_subscription_once_for_all_its_sockets_when_a_window_ends():
    """Many sockets of one subscription shown figures whose window ends in a moment: one read
    then, offered to all of them; a window days away arms a timer and reads nothing; the last
    socket gone, its timer goes."""
    now = dt.datetime.now(UTC)
    fresh = _usage(11, resets=[None, _iso(now + dt.timedelta(days=6))], at=_iso(now))
    reads = _CountingReads(lambda _sub: fresh)
    hub = live.UsageHub(None, "", reads, slack=0.3)  # type: ignore[arg-type] - not started: no listening
    watchers = [hub.watch(11, 1) for _ in range(200)]
    far = hub.watch(12, 2)
    ending = _usage(11, resets=[_iso(now + dt.timedelta(seconds=1)), _iso(now + dt.timedelta(days=6))],
                    at=_iso(now))
    for _ in watchers:  # each socket, after sending the figures, tells the hub (sockets._pump)
        hub.shown(ending)
    hub.shown(_usage(12, resets=[_iso(now + dt.timedelta(hours=4)), _iso(now + dt.timedelta(days=3))],
                     at=_iso(now)))
    got = await asyncio.gather(*(_next(w, 5) for w in watchers))
    assert all(value is fresh for value in got)
    assert reads.reads == [11]  # once, for the 200 sockets
    for value in got:  # sent: their next change is the week's end
        hub.shown(value)
    # the far window: a timer, no read (and re-armed within the hour rather than days ahead)
    with pytest.raises(TimeoutError):
        await _next(far, 0.5)
    assert reads.reads == [11]
    assert set(hub._due) == {11, 12}  # 11 armed again, at its week's end
    loop = asyncio.get_running_loop()
    assert hub._due[12][1].when() - loop.time() <= live.LONGEST_NAP
    for w in (*watchers, far):
        hub.unwatch(w)
    assert hub._due == {} and hub.watching == 0


async def test_the_hub_reads_again_at_midnight_when_today_counts_requests():
    """`today` starts again at 00:00 UTC: figures read before midnight (here: yesterday) that
    count requests today are read again, once the subscription's offset in the spread passed."""
    now = dt.datetime.now(UTC)
    yesterday = now - dt.timedelta(days=1)
    week = _iso(now + dt.timedelta(days=5))
    reads = _CountingReads(lambda sub: _usage(sub, resets=[None, week], at=_iso(now), requests=0))
    hub = live.UsageHub(None, "", reads, slack=0.2, spread=0.0)  # type: ignore[arg-type]
    counting, idle = hub.watch(21, 1), hub.watch(22, 2)
    hub.shown(_usage(21, resets=[None, week], at=_iso(yesterday), requests=4))
    hub.shown(_usage(22, resets=[None, week], at=_iso(yesterday), requests=0))  # nothing to roll over
    value = await _next(counting, 5)
    assert value is not None and value.today.requests == 0
    with pytest.raises(TimeoutError):
        await _next(idle, 0.5)
    assert reads.reads == [21]
    hub.unwatch(counting)
    hub.unwatch(idle)


# ---- the dashboard in Chinese ----------------------------------------------------------------


def test_the_dashboards_table_words_all_have_their_chinese(database):
    """The words the tables print through `_()` from data, not literals the page test finds:
    the top-up and overage columns, and every state a ledger row can be in (the schema's
    CHECK, read from the database)."""
    [row] = run(query(database, "SELECT pg_get_constraintdef(c.oid) AS def FROM pg_constraint c"
                                " WHERE c.conrelid = 'usage_ledger'::regclass AND c.contype = 'c'"
                                " AND pg_get_constraintdef(c.oid) LIKE '%state%posted%'"))
    states = re.findall(r"'([a-z_]+)'", row["def"])
    assert set(states) == {"pending", "posted", "voided", "expired"}, row["def"]
    missing = [w for w in (*dashboard._EXTRA_COLUMNS, *states) if w not in i18n.ZH]
    assert not missing, missing


def test_the_chinese_dashboard_shows_top_ups_and_todays_requests_in_chinese(site, database):
    """Was: the top-up table's headers printed raw (English), its figures without thousands
    separators (20000000), its end a raw UTC string the page's script never localised; today's
    requests' states in English. Now: Chinese headers and states, 20,000,000, and the end a
    <time datetime> like the page's other times."""
    client, secret, account = _signed_in(site, database, lang="zh")
    _spend(site, secret, database)
    topup = run(query(database,
                      "INSERT INTO topups (account_id, tokens, amount, currency, expires_at, stripe_checkout_session_id)"
                      " VALUES ($1, 20000000, 0, 'usd', now() + interval '365 days', 'mend-' || gen_random_uuid())"
                      " RETURNING id", account))[0]["id"]
    window = run(query(database, "SELECT billing_topup_attach($1) AS id", topup))[0]["id"]
    run(query(database, "UPDATE quota_windows SET posted = 1234567 WHERE id = $1", window))
    ends = run(query(database, "SELECT ends_at FROM quota_windows WHERE id = $1", window))[0]["ends_at"]
    page = client.get("/dashboard").text
    section = page[page.index("<h2 id=\"extra-1\">"):]
    section = section[:section.index("</table>")]
    headers = re.findall(r'<th scope="col">([^<]*)</th>', section)
    assert headers == ["额度", "已用", "进行中", "剩余", "到期时间"], headers
    cells = re.findall(r"<td>(.*?)</td>", section)
    assert cells[:4] == ["20,000,000", "1,234,567", "0", "18,765,433"], cells
    # as the page writes its other times (a UTC ISO `datetime` its script localises)
    shown = re.fullmatch(r'<time datetime="(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)">\1</time>', cells[4])
    assert shown, cells[4]
    assert abs(dt.datetime.fromisoformat(shown.group(1).replace("Z", "+00:00")) - ends) < dt.timedelta(seconds=1)
    table = page[page.index('<table id="recent">'):]
    table = table[:table.index("</table>")]
    body = table[table.index("<tbody>"):]
    states = [re.findall(r"<td>(.*?)</td>", row)[3] for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]
    assert states == ["已入账"], table
    # the activity fragment the live refresh fetches says the same
    fragment = client.get("/dashboard/activity").text
    assert "<td>已入账</td>" in fragment and "<td>posted</td>" not in fragment


# ---- what the sweeper bills, in the metrics ------------------------------------------------


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _admitted_by_a_process_that_dies(url: str, sub: int, key: int, prompt: int, lease: float) -> uuid.UUID:
    pool = await db.create_pool(url, size=2)
    try:
        entry = uuid.uuid4()
        admission = await Ledger(pool, lease_seconds=lease).admit(
            Reservation(entry, sub, key, "chat", "glm-4.6", prompt, 600, 600))
        assert admission.admitted
        return entry
    finally:
        await pool.close()


async def test_expiring_says_what_each_entry_recorded_and_billed(fresh_database):
    url = fresh_database
    plan = new_plan(url, window=100_000, weekly=500_000)
    new_user(url, plan)
    [ids] = await query(url, "SELECT s.id AS sub, k.id AS key FROM subscriptions s JOIN api_keys k"
                             " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan)
    silent = await _admitted_by_a_process_that_dies(url, ids["sub"], ids["key"], 40, 0.2)
    proven = await _admitted_by_a_process_that_dies(url, ids["sub"], ids["key"], 50, 0.2)
    pool = await db.create_pool(url, size=2)
    try:
        ledger = Ledger(pool, lease_seconds=0.2)
        await ledger.heartbeat(proven, 17)
        await asyncio.sleep(0.4)
        expired = await ledger.expire_due_entries()
        assert await ledger.expire_due_entries() == []
    finally:
        await pool.close()
    rows = {r["id"]: r for r in await query(url, "SELECT * FROM usage_ledger")}
    assert sorted(expired, key=lambda e: e.billed) == sorted(
        [ExpiredEntry(r["model"], r["prompt_tokens"], r["completion_tokens"], r["billed_tokens"])
         for r in (rows[silent], rows[proven])], key=lambda e: e.billed)
    assert sorted(e.billed for e in expired) == [40, 67]


def test_the_credits_metric_counts_what_the_sweeper_bills(fresh_database, simulator):
    """Was: `codeplan_credits_total` moved only with the bridge's own settlements: an entry
    whose process died, expired and billed by the sweeper, was in the ledger and not in the
    metric. Now the sweeper counts it, credits and tokens, in the same metrics."""
    url = fresh_database
    plan = new_plan(url, window=1_000_000, weekly=5_000_000)
    key = new_user(url, plan)
    server = start_bridge(url, simulator.url + "/api/coding/paas/v4", CODEPLAN_SWEEP_INTERVAL="1")
    try:
        r = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json=CHAT, timeout=30)
        assert r.status_code == 200
        wait_settled(url)
        time.sleep(0.3)
        before = httpx.get(server.url + "/metrics").text
        [ids] = run(query(url, "SELECT s.id AS sub, k.id AS key FROM subscriptions s JOIN api_keys k"
                               " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan))
        entry = run(_admitted_by_a_process_that_dies(url, ids["sub"], ids["key"], 500, 1))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            [row] = run(query(url, "SELECT state, billed_tokens, prompt_tokens FROM usage_ledger WHERE id = $1",
                              entry))
            if row["state"] != "pending":
                break
            time.sleep(0.2)
        assert row["state"] == "expired" and row["billed_tokens"] == 500, row
        time.sleep(0.3)  # the sweeper counts right after its statement returns
        after = httpx.get(server.url + "/metrics").text
        assert _sample(after, "codeplan_credits_total", model="glm-4.6") - \
            _sample(before, "codeplan_credits_total", model="glm-4.6") == 500
        assert _sample(after, "codeplan_tokens_total", model="glm-4.6", kind="prompt") - \
            _sample(before, "codeplan_tokens_total", model="glm-4.6", kind="prompt") == 500
        # and the metric adds up to the ledger
        billed = run(query(url, "SELECT sum(billed_tokens) AS n FROM usage_ledger"))[0]["n"]
        assert _sample(after, "codeplan_credits_total", model="glm-4.6") == billed
    finally:
        server.stop()


# ---- in Chromium (last: its sync API holds an event loop the async tests above cannot share) ----


def test_in_a_browser_the_top_up_end_is_local_time_and_the_meter_resets_when_the_window_ends(
        browser, site, database):  # noqa: F811
    """The Chinese page in Chromium: the top-up's end is localised by the page's script like the
    other times (not the raw UTC string), and when the 5-hour window ends the meter says so
    (used 0, "opens with your next request") with no request and no reload."""
    client, secret, account = _signed_in(site, database, lang="zh")
    _spend(site, secret, database)
    topup = run(query(database,
                      "INSERT INTO topups (account_id, tokens, amount, currency, expires_at, stripe_checkout_session_id)"
                      " VALUES ($1, 20000000, 0, 'usd', now() + interval '365 days', 'mend-' || gen_random_uuid())"
                      " RETURNING id", account))[0]["id"]
    run(query(database, "SELECT billing_topup_attach($1)", topup))
    run(query(database, "UPDATE quota_windows q SET starts_at = now() - interval '5 hours' + interval '4 seconds',"
                        " ends_at = now() + interval '4 seconds' FROM subscriptions s"
                        " WHERE s.id = q.subscription_id AND s.account_id = $1 AND q.kind = '5h'", account))
    context = browser.new_context(locale="zh-CN", timezone_id="Asia/Shanghai")
    try:
        context.add_cookies([{"name": "codeplan_session", "value": client.session,
                              "domain": urlsplit(site.url).hostname, "path": "/"}])
        page = context.new_page()
        page.goto(site.url + "/dashboard")
        ends = page.locator("section:has(#extra-1) td time")
        assert ends.count() == 1, page.inner_html("section:has(#extra-1)")
        raw = ends.get_attribute("datetime")
        assert raw and raw.endswith("Z")
        assert ends.inner_text() not in ("", raw), ends.inner_text()
        used = page.locator('[data-window="5h"] [data-field="used"]')
        assert used.inner_text() != "0"
        deadline = time.monotonic() + 12  # the window's end (4 s), the slack, the push
        while used.inner_text() != "0" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert used.inner_text() == "0"
        assert page.inner_text('[data-window="5h"] [data-field="resets_at"]') == i18n.ZH["Opens with your next request"]
    finally:
        context.close()
