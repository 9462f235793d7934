"""A plan change reaches the live usage feed when it commits, not at the next settlement: an
operator's change of a plan's allowances (PATCH /admin/plans/..., `plan_apply_allowances`) and a
plan change Stripe tells of (`billing_apply_subscription`, from a webhook) each notify the feed's
channel (`codeplan_usage`, the subscription's id, as a settlement does: service/web/live.py), once
per subscription whose figures moved, and not at all when nothing did (migrations/0056)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import asyncpg
import httpx
import pytest
from websockets.sync.client import connect

from service import accounts

from .billing.conftest import events_settled, start_billing_bridge, start_fake, stripe_sync
from .billing.test_lifecycle import Subscriber
from .conftest import new_plan, query, run, settled_query, wait_settled

ADMIN = "plan-change-notifies-admin-" + "n" * 24
CHANNEL = "codeplan_usage"
CHAT = {"model": "glm-4.6", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def fake():
    server, control = start_fake()
    yield control
    server.stop()


@pytest.fixture(scope="module")
def srv(database, simulator, fake):
    assert stripe_sync(database, fake).returncode == 0
    server = start_billing_bridge(database, simulator, fake, CODEPLAN_ADMIN_TOKEN=ADMIN)
    yield server
    server.stop()


class Notices:
    """LISTEN on the live feed's channel from a thread of its own: every payload, in commit order.
    `settled()` sends a marker and waits for it: whatever committed before has arrived by then."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.payloads: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> "Notices":
        self._thread.start()
        self._call(self._open())
        return self

    def __exit__(self, *_) -> None:
        self._call(self._conn.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _open(self) -> None:
        self._conn = await asyncpg.connect(self.database)
        await self._conn.add_listener(CHANNEL, lambda _c, _pid, _channel, payload: self.payloads.append(payload))

    def settled(self) -> list[str]:
        """The payloads up to now (the marker left out), then forgotten."""
        marker = "marker-" + uuid.uuid4().hex
        run(query(self.database, "SELECT pg_notify($1, $2)", CHANNEL, marker))
        deadline = time.monotonic() + 30
        while marker not in self.payloads:
            assert time.monotonic() < deadline, "the marker did not come back"
            time.sleep(0.02)
        got = self.payloads[:self.payloads.index(marker)]
        del self.payloads[:self.payloads.index(marker) + 1]
        return got


def _user(database: str, plan: str) -> tuple[str, int]:
    async def create():
        conn = await asyncpg.connect(database)
        try:
            user = await accounts.create_user(conn, f"{uuid.uuid4().hex[:10]}@example.com", plan)
            return user.key, await conn.fetchval("SELECT id FROM subscriptions WHERE account_id = $1",
                                                 user.account_id)
        finally:
            await conn.close()
    return run(create())


def _live(server, key: str):
    return connect(server.url.replace("http://", "ws://") + "/v1/usage/live",
                   additional_headers={"authorization": f"Bearer {key}"}, open_timeout=30)


def _allowances(message: dict) -> dict[str, int]:
    return {w["kind"]: w["allowance"] for w in message["windows"]}


def _admin_patch(server, plan: str, body: dict) -> httpx.Response:
    answer = httpx.patch(server.url + f"/admin/plans/{plan}", json=body, timeout=30,
                         headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200, answer.text
    return answer


def _settlements(database: str) -> int:
    return settled_query(database, "SELECT count(*) AS n FROM usage_ledger")[0]["n"]


def test_an_operators_change_of_a_plans_allowances_reaches_its_live_sockets_at_once(srv, database):
    plan = new_plan(database, 1_000_000, 5_000_000)
    used_key, used = _user(database, plan)  # a request first: its windows are open
    fresh_key, fresh = _user(database, plan)  # none yet: its figures are the plan's own
    _, elsewhere = _user(database, "pro")
    answer = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=60,
                        headers={"authorization": f"Bearer {used_key}"})
    assert answer.status_code == 200, answer.text
    wait_settled(database)
    with Notices(database) as notices, _live(srv, used_key) as used_ws, _live(srv, fresh_key) as fresh_ws:
        for ws in (used_ws, fresh_ws):
            assert _allowances(json.loads(ws.recv(timeout=30))) == {"5h": 1_000_000, "week": 5_000_000}
        notices.settled()
        settlements = _settlements(database)

        _admin_patch(srv, plan, {"window_credits": 2_000_000, "weekly_credits": 9_000_000})
        # pushed when the change commits (no settlement: nothing else would push it)
        for ws in (used_ws, fresh_ws):
            pushed = json.loads(ws.recv(timeout=5))
            assert _allowances(pushed) == {"5h": 2_000_000, "week": 9_000_000}, pushed
        # one notification per subscription of the plan, none for another plan's
        assert sorted(notices.settled()) == sorted([str(used), str(fresh)])
        assert str(elsewhere) not in notices.payloads

        # one allowance alone: every subscription's figures moved (an open window, or the plan's own)
        _admin_patch(srv, plan, {"window_credits": 3_000_000})
        for ws in (used_ws, fresh_ws):
            pushed = json.loads(ws.recv(timeout=5))
            assert _allowances(pushed) == {"5h": 3_000_000, "week": 9_000_000}, pushed
        assert sorted(notices.settled()) == sorted([str(used), str(fresh)])

        # nothing moved: nothing told
        _admin_patch(srv, plan, {"window_credits": 3_000_000, "weekly_credits": 9_000_000})
        _admin_patch(srv, plan, {"name": "Renamed", "monthly_price_cents": 5})
        assert notices.settled() == []
        assert _settlements(database) == settlements
    windows = settled_query(database, "SELECT kind, allowance FROM quota_windows WHERE subscription_id = $1"
                                      " AND ends_at > now() AND kind IN ('5h', 'week')", used)
    assert {r["kind"]: r["allowance"] for r in windows} == {"5h": 3_000_000, "week": 9_000_000}


def test_a_plan_change_stripe_tells_of_reaches_the_live_socket_at_once(srv, database, fake):
    user = Subscriber(database, fake, srv, "pro")
    assert user.chat() == 200  # its windows are open
    wait_settled(database)
    big = run(query(database, "SELECT window_tokens, weekly_tokens FROM plans WHERE id = 'max'"))[0]
    with Notices(database) as notices, _live(srv, user.key) as ws:
        first = json.loads(ws.recv(timeout=30))
        assert first["plan"] == "pro", first
        notices.settled()
        settlements = _settlements(database)

        # an event that changes no plan (metadata): nothing told
        fake.client().v1.subscriptions.update(user.stripe_id, {"metadata": {"note": "nothing moves"}})
        events_settled(database, fake)
        assert notices.settled() == []

        # the Customer Portal's upgrade, paid at once: applied from the webhook
        plan_item = next(i for i in user.stripe()["items"].data if i.price.recurring.usage_type == "licensed")
        max_price = fake.client().v1.prices.list({"lookup_keys": ["codeplan_max_month"]}).data[0]
        fake.client().v1.subscriptions.update(user.stripe_id, {
            "items": [{"id": plan_item.id, "price": max_price.id}], "proration_behavior": "always_invoice"})
        events_settled(database, fake)
        assert user.row()["plan_id"] == "max"
        told = notices.settled()
        assert told and set(told) == {str(user.local)}, told
        # the socket has the new plan without a settlement (events applied: it is on its way)
        while (pushed := json.loads(ws.recv(timeout=5)))["plan"] != "max":
            pass
        assert _allowances(pushed) == {"5h": big["window_tokens"], "week": big["weekly_tokens"]}, pushed
        assert _settlements(database) == settlements
