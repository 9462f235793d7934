"""How figures are rounded for the user: a count's unit is chosen on the figure as printed, a
window reads 100% only when nothing is left, and a reset is never shown before the window ends
(service/statusline.py, service/web/chart.py, service/usage.py)."""
from __future__ import annotations

import datetime as dt

import httpx
import pytest

from service import statusline
from service.web import chart

from .conftest import new_plan, new_user, query, run, wait_settled

CHAT = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}


@pytest.mark.parametrize("n, shown", [
    (0, "0"), (999, "999"), (1_000, "1k"), (1_500, "1.5k"), (999_949, "999.9k"),
    # rounded to 1000.0 of a unit: the next unit's 1
    (999_950, "1M"), (999_999, "1M"), (999_950_000, "1B"), (999_999_999, "1B"),
    (160_000_000, "160M"), (155_200_000, "155.2M"), (-999_950, "-1M"), (2_500_000_000_000, "2500B"),
])
def test_compact_never_prints_1000_of_a_unit(n, shown):
    """Was: `compact` chose the unit, then rounded: 999,950 read "1000k", 999,999,999 "1000M", in
    the status line and on the pages (the same function, written twice; the pages' is now the
    status line's: statusline.py stays standard library only, served as a script on its own)."""
    assert statusline.compact(n) == shown
    assert chart.compact(n) == shown


def _window(allowance: int, used: int, reserved: int = 0) -> dict:
    return {"kind": "5h", "allowance": allowance, "used": used, "reserved": reserved,
            "remaining": max(0, allowance - used - reserved), "resets_at": None}


@pytest.mark.parametrize("used, reserved, shown", [
    (159_360_000, 0, "5h 99%"),  # 99.6%: 640k left
    (159_999_999, 0, "5h 99%"),  # one credit left
    (150_000_000, 9_999_999, "5h 99%"),
    (160_000_000, 0, "5h 100%"),
    (150_000_000, 10_000_000, "5h 100%"),  # nothing left once the pending requests are counted
    (170_000_000, 0, "5h 100%"),  # past it (an overage)
    (799_999, 0, "5h 0%"),  # 0.5%: rounded down
    (80_000_000, 0, "5h 50%"),
])
def test_statusline_says_100_percent_only_of_a_window_with_nothing_left(used, reserved, shown):
    """Was: `f"{pct:.0f}%"`: at 99.6% the status line read "100%" (full, to the user) while 640k
    credits were left and requests still admitted."""
    line = statusline.one_line({"plan": {"id": "pro"}, "windows": [_window(160_000_000, used, reserved)]})
    assert f"{shown} (" in line, line


@pytest.fixture(scope="module")
def keyed(bridge, database):
    """A key that has spent once (its 5-hour window is open), and its subscription."""
    plan = new_plan(database, window=10_000_000, weekly=50_000_000)
    key = new_user(database, plan)
    r = httpx.post(bridge.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                   json=CHAT, timeout=30)
    assert r.status_code == 200, r.text
    wait_settled(database)
    sub = run(query(database, "SELECT s.id FROM subscriptions s JOIN api_keys k ON k.account_id = s.account_id"
                              " WHERE k.prefix = $1", key[:10]))[0]["id"]
    return key, sub


def _five_hours(bridge, key: str) -> dict:
    reply = httpx.get(bridge.url + "/api/monitor/usage/quota/limit", headers={"authorization": key},
                      timeout=10).json()
    assert reply["success"], reply
    [five] = [entry for entry in reply["data"]["limits"] if entry["type"] == "CREDIT_LIMIT" and entry["unit"] == 3]
    return five


def test_zai_quota_percentage_is_100_only_when_nothing_is_left(bridge, database, keyed):
    """Was: `min(100, round(100 * used / allowance))`: at 99.6% Z.ai's quota endpoint said 100
    (HUDs show the limit reached) while 0.4% of the window remained."""
    key, sub = keyed
    [w] = run(query(database, "SELECT allowance, reserved FROM quota_windows WHERE subscription_id = $1"
                              " AND kind = '5h' AND ends_at > now()", sub))
    assert w["reserved"] == 0
    for posted, percentage in [(w["allowance"] - w["allowance"] // 250, 99), (w["allowance"] - 1, 99),
                               (w["allowance"], 100), (w["allowance"] // 2, 50)]:
        run(query(database, "UPDATE quota_windows SET posted = $2 WHERE subscription_id = $1 AND kind = '5h'"
                            " AND ends_at > now()", sub, posted))
        five = _five_hours(bridge, key)
        assert (five["percentage"], five["remaining"]) == (percentage, w["allowance"] - posted), five
    [legacy] = [entry for entry in httpx.get(bridge.url + "/api/monitor/usage/quota/limit",
                                             headers={"authorization": key}, timeout=10).json()["data"]["limits"]
                if entry["type"] == "TOKENS_LIMIT" and entry["unit"] == 3]
    assert legacy["percentage"] == 50


def test_zai_next_reset_time_is_not_before_the_window_ends(bridge, database, keyed):
    """Was: `nextResetTime` was the window's end with its microseconds cut off: a moment up to a
    second before the window ends, when a request is still refused by it. Now it is the whole
    second at or after the end."""
    key, sub = keyed
    base = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(hours=4)
    for ends, shown in [(base + dt.timedelta(microseconds=1), base + dt.timedelta(seconds=1)),
                        (base + dt.timedelta(microseconds=999_999), base + dt.timedelta(seconds=1)),
                        (base, base)]:
        run(query(database, "UPDATE quota_windows SET ends_at = $2 WHERE subscription_id = $1 AND kind = '5h'"
                            " AND ends_at > now()", sub, ends))
        five = _five_hours(bridge, key)
        assert five["nextResetTime"] == int(shown.timestamp()) * 1000, (ends, five)
        assert five["nextResetTime"] >= ends.timestamp() * 1000
