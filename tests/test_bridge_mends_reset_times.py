"""Reset times told to clients are never before the window ends. A window ends at its opening
`now()` plus its length, to the microsecond; `iso_utc` cut it to the second and Codex's
`resets_at` was `int(time + wait)`: both named a moment up to a second early, when a request is
still refused by the window (a status line or a tool retrying then is refused once more)."""
from __future__ import annotations

import datetime as dt
import math
import re
import time

import httpx
import pytest

from bridge.errors import BridgeError, Kind
from bridge.journey import iso_utc
from bridge.surfaces import responses

from .conftest import new_plan, new_user, query, run, wait_settled

UTC = dt.timezone.utc


@pytest.mark.parametrize("moment, shown", [
    (dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC), "2026-03-01T12:00:00Z"),  # a whole second: itself
    (dt.datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=UTC), "2026-03-01T12:00:01Z"),
    (dt.datetime(2026, 3, 1, 12, 0, 0, 999_999, tzinfo=UTC), "2026-03-01T12:00:01Z"),
    (dt.datetime(2026, 3, 1, 23, 59, 59, 500_000, tzinfo=UTC), "2026-03-02T00:00:00Z"),  # over midnight
    (dt.datetime(2026, 3, 2, 7, 59, 59, 250_000, tzinfo=dt.timezone(dt.timedelta(hours=8))), "2026-03-02T00:00:00Z"),
])
def test_an_edge_is_shown_at_the_whole_second_at_or_after_it(moment, shown):
    assert iso_utc(moment) == shown


def test_codex_is_told_a_reset_at_or_after_the_window_ends(monkeypatch):
    monkeypatch.setattr(responses.time, "time", lambda: 1_000_000.5)
    error = BridgeError(Kind.quota_exhausted, "Usage limit reached.", code="1308", retry_after=3599.7)
    # the window ends at 1_003_600.2: 1_003_600 would be before it
    assert responses.error_detail(error).resets_at == 1_003_601


# ---- end to end: a full window, on every place a reset is told ----------------------------------

def _full_window(bridge, database) -> tuple[str, dt.datetime]:
    """A key whose 5-hour window is full and ends half-way through a second: (key, its end)."""
    key = new_user(database, new_plan(database, window=2_000, weekly=50_000))
    r = httpx.post(bridge.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                   json={"model": "glm-4.6", "max_tokens": 50,
                         "messages": [{"role": "user", "content": "[[sim tokens=3 reasoning=0]] hi"}]})
    assert r.status_code == 200, r.text
    wait_settled(database)
    [row] = run(query(database, "UPDATE quota_windows SET posted = allowance - 100,"
                                " ends_at = date_trunc('second', ends_at) + interval '0.5 second'"
                                " WHERE kind = '5h' AND id IN (SELECT window_id FROM usage_ledger l"
                                " JOIN api_keys k ON k.id = l.api_key_id WHERE k.prefix = $1) RETURNING ends_at",
                      key[:10]))
    return key, row["ends_at"]


def test_a_full_windows_reset_is_never_told_early(bridge, database):
    key, ends = _full_window(bridge, database)
    headers = {"authorization": f"Bearer {key}"}
    chat = httpx.post(bridge.url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": "glm-4.6", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]})
    told_at = dt.datetime.now(UTC)
    assert chat.status_code == 429 and chat.json()["error"]["code"] == "1308", chat.text
    said = re.search(r"reset at (\S+Z)", chat.json()["error"]["message"]).group(1)
    assert dt.datetime.fromisoformat(said.replace("Z", "+00:00")) == ends + dt.timedelta(seconds=0.5)
    assert int(chat.headers["retry-after"]) >= math.ceil((ends - told_at).total_seconds())

    codex = httpx.post(bridge.url + "/v1/responses", headers=headers, timeout=30,
                       json={"model": "glm-4.6", "input": "hi", "max_output_tokens": 500})
    assert codex.status_code == 429 and codex.json()["error"]["type"] == "usage_limit_reached", codex.text
    assert codex.json()["error"]["resets_at"] >= ends.timestamp()

    usage = httpx.get(bridge.url + "/v1/usage", headers=headers, timeout=10).json()
    [five] = [w for w in usage["windows"] if w["kind"] == "5h"]
    assert dt.datetime.fromisoformat(five["resets_at"].replace("Z", "+00:00")) == ends + dt.timedelta(seconds=0.5)
    assert time.time() < ends.timestamp()  # (the window did not end meanwhile)
