"""Figures that show the same thing agree: Z.ai's model-usage totals are of the hours it shows
(a range longer than 31 days is answered for its last 31), and `GET /v1/usage`'s today and week
count the account's subscriptions, as the live socket's today does (service/usage.py). Real
server subprocess, real PostgreSQL."""
from __future__ import annotations

import datetime as dt
import json

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from .conftest import new_plan, new_user, query, run, start_bridge, wait_settled

UTC = dt.timezone.utc
CHAT = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}


@pytest.fixture(scope="module")
def server(database, simulator):
    # no cache of keys: a new subscription is the key's at its next request
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_AUTH_CACHE_TTL="0")
    yield server
    server.stop()


def _spend(server, key: str, database: str) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                   json=CHAT, timeout=30)
    assert r.status_code == 200, r.text
    wait_settled(database)


def _fmt(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _model_usage(server, key: str, start: dt.datetime, end: dt.datetime) -> dict:
    reply = httpx.get(server.url + "/api/monitor/usage/model-usage", headers={"authorization": key},
                      params={"startTime": _fmt(start), "endTime": _fmt(end)}, timeout=10).json()
    assert reply["success"], reply
    return reply["data"]


def test_a_range_longer_than_31_days_is_its_last_31_days_in_hours_and_totals(server, database):
    """Was: the hours stopped after 31 days from the start (24 * 31 of them) while the totals
    summed the whole range: asked for the last 40 days, the hours showed the call of 35 days ago
    and not today's, the totals both. Now the range is cut to its last 744 hours, for both."""
    plan = new_plan(database, window=10_000_000, weekly=50_000_000)
    key = new_user(database, plan)
    _spend(server, key, database)
    _spend(server, key, database)
    sub = run(query(database, "SELECT s.id FROM subscriptions s JOIN api_keys k ON k.account_id = s.account_id"
                              " WHERE k.prefix = $1", key[:10]))[0]["id"]
    [old, recent] = run(query(database, "SELECT id, billed_tokens FROM usage_ledger WHERE subscription_id = $1"
                                        " ORDER BY created_at", sub))
    run(query(database, "UPDATE usage_ledger SET created_at = now() - interval '35 days' WHERE id = $1", old["id"]))
    now = dt.datetime.now(UTC)
    end = (now + dt.timedelta(hours=1)).replace(minute=59, second=59, microsecond=0)
    data = _model_usage(server, key, now - dt.timedelta(days=40), end)
    total = data["totalUsage"]
    assert (total["totalModelCallCount"], total["totalTokensUsage"]) == (1, recent["billed_tokens"])
    assert (sum(data["modelCallCount"]), sum(data["tokensUsage"])) == (1, recent["billed_tokens"])
    assert len(data["x_time"]) == len(data["modelCallCount"]) == len(data["tokensUsage"]) == 24 * 31
    assert data["x_time"][-1] == end.strftime("%Y-%m-%d %H:00")
    # exactly 31 days from a half hour: the hours it touches are 745, the last 744 are drawn
    last = (now + dt.timedelta(hours=1)).replace(minute=29, second=59, microsecond=0)
    data = _model_usage(server, key, last + dt.timedelta(seconds=1) - dt.timedelta(days=31), last)
    assert len(data["x_time"]) == 24 * 31
    assert data["totalUsage"]["totalModelCallCount"] == sum(data["modelCallCount"]) == 1
    # a short range is drawn whole, from the hour of its start
    data = _model_usage(server, key, now - dt.timedelta(hours=3), end)
    assert data["x_time"][0] == (now - dt.timedelta(hours=3)).strftime("%Y-%m-%d %H:00")
    assert len(data["x_time"]) == 5


def test_v1_usage_today_and_week_count_every_subscription_of_the_account(server, database):
    """Was: `GET /v1/usage` counted today and this week on the current subscription only, the live
    socket's `today` (and the dashboard's) on the account: after a cancel and a new subscription
    the same day the morning's requests were gone from one and not the other."""
    plan = new_plan(database, window=10_000_000, weekly=50_000_000)
    key = new_user(database, plan)
    _spend(server, key, database)
    account = run(query(database, "SELECT account_id FROM api_keys WHERE prefix = $1", key[:10]))[0]["account_id"]
    run(query(database, "UPDATE subscriptions SET status = 'canceled', ended_at = now() WHERE account_id = $1",
              account))
    run(query(database, "INSERT INTO subscriptions (account_id, plan_id, status) VALUES ($1, $2, 'active')",
              account, plan))
    _spend(server, key, database)
    billed = run(query(database, "SELECT coalesce(sum(l.billed_tokens), 0)::bigint AS b FROM usage_ledger l"
                                 " JOIN subscriptions s ON s.id = l.subscription_id WHERE s.account_id = $1",
                       account))[0]["b"]
    report = httpx.get(server.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=10).json()
    with ws_connect(server.url.replace("http://", "ws://") + "/v1/usage/live",
                    additional_headers={"Authorization": f"Bearer {key}"}) as socket:
        live = json.loads(socket.recv(timeout=10))
    assert (live["today"]["requests"], live["today"]["billed_tokens"]) == (2, billed)
    for period in ("today", "week"):
        figures = report[period]
        assert (sum(m["requests"] for m in figures.values()), sum(m["credits"] for m in figures.values()),
                sum(m["billed_tokens"] for m in figures.values())) == (2, billed, billed), (period, figures)
