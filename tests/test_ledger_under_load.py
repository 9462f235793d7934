"""The allowance holds under load, and a killed bridge leaves nothing unsettled or settled twice."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

import asyncpg
import httpx
import openai
import pytest

from .conftest import new_plan, new_user, query, run, start_bridge, wait_settled


@pytest.fixture(scope="module")
def second_bridge(database, simulator):
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4")
    yield server
    server.stop()


async def test_500_concurrent_requests_never_exceed_the_window(bridge, database):
    await _overbooking_attempt(database, [bridge], 500)


async def test_two_bridge_processes_share_one_window_exactly(bridge, second_bridge, database):
    """Admission is atomic across processes sharing the database, not only within one."""
    await _overbooking_attempt(database, [bridge, second_bridge], 400)


async def _overbooking_attempt(database, bridges, total: int) -> None:
    # each request reserves ~prompt + 100 tokens and uses ~prompt + 30: room for only part of them
    allowance = 12_000
    key = new_user(database, new_plan(database, window=allowance, weekly=allowance * 10))
    clients = [openai.AsyncOpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0, timeout=120) for b in bridges]
    violations: list[tuple[int, int]] = []
    done = threading.Event()
    polls = 0

    def watch() -> None:
        """Polls the window on its own thread and loop, so the clients' load cannot starve it."""
        nonlocal polls

        async def poll() -> None:
            nonlocal polls
            conn = await asyncpg.connect(database)
            try:
                while not done.is_set():
                    for row in await conn.fetch(
                            "SELECT w.allowance, w.reserved, w.posted FROM quota_windows w JOIN api_keys k"
                            " ON k.prefix = $1 JOIN subscriptions s ON s.account_id = k.account_id"
                            " AND s.id = w.subscription_id", key[:10]):
                        polls += 1
                        if row["reserved"] + row["posted"] > row["allowance"]:
                            violations.append((row["reserved"], row["posted"]))
                    await asyncio.sleep(0.005)
            finally:
                await conn.close()
        asyncio.run(poll())

    async def one(i: int):
        client = clients[i % len(clients)]
        try:
            stream = await client.chat.completions.create(
                model="glm-4.6", max_tokens=100, stream=True,
                messages=[{"role": "user", "content": f"[[sim ttft=30 tps=300 tokens=30 reasoning=0]] job {i}"}])
            last = None
            async for chunk in stream:
                last = chunk
            return last.usage
        except openai.RateLimitError as exc:
            return exc.response.json()["error"]["code"]

    watcher = threading.Thread(target=watch)
    watcher.start()
    results = await asyncio.gather(*(one(i) for i in range(total)))
    done.set()
    watcher.join()
    served = [r for r in results if not isinstance(r, str)]
    refused = [r for r in results if isinstance(r, str)]
    assert polls > 10 and violations == []
    assert set(refused) == {"1308"}
    await asyncio.to_thread(wait_settled, database)
    assert len(served) + len(refused) == total and served and refused
    rows = await query(database, "SELECT l.state, l.billed_tokens FROM usage_ledger l JOIN api_keys k"
                                 " ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10])
    assert len(rows) == len(served) and {r["state"] for r in rows} == {"posted"}
    window = (await query(database, "SELECT w.* FROM quota_windows w JOIN usage_ledger l ON l.window_id = w.id"
                                    " JOIN api_keys k ON k.id = l.api_key_id WHERE k.prefix = $1 LIMIT 1", key[:10]))[0]
    # every prompt is a single message: nothing cached, so billed == what the simulator reported
    assert window["reserved"] == 0
    assert window["posted"] == sum(u.total_tokens for u in served) <= allowance


def test_sigkill_during_20_streams_then_sweep_settles_each_once(database, simulator):
    env = dict(CODEPLAN_RESERVATION_LEASE="2", CODEPLAN_HEARTBEAT_INTERVAL="0.3",
               CODEPLAN_SWEEP_INTERVAL="0.5")
    upstream = simulator.url + "/api/coding/paas/v4"
    victim = start_bridge(database, upstream, **env)
    key = new_user(database)
    progress: list[int] = [0] * 20

    def stream(i: int) -> None:
        try:
            with httpx.stream("POST", victim.url + "/v1/chat/completions", timeout=30,
                              headers={"authorization": f"Bearer {key}"},
                              json={"model": "glm-4.6", "stream": True, "messages": [{"role": "user",
                                    "content": f"[[sim tps=25 tokens=100 reasoning=0]] stream {i}"}]}) as r:
                for line in r.iter_lines():
                    if '"content"' in line:
                        progress[i] += 1
        except httpx.HTTPError:
            pass  # the bridge died under it

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while min(progress) < 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # at least one heartbeat after that
    victim.kill()
    for t in threads:
        t.join(10)
    assert min(progress) >= 15 and max(progress) < 100

    rows = run(query(database, "SELECT state FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                               " WHERE k.prefix = $1", key[:10]))
    assert len(rows) == 20 and {r["state"] for r in rows} == {"pending"}

    survivor = start_bridge(database, upstream, **env)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                                       " WHERE k.prefix = $1", key[:10]))
            if all(r["state"] != "pending" for r in rows):
                break
            time.sleep(0.2)
        assert {r["state"] for r in rows} == {"expired"}
        for row in rows:
            assert row["estimated"] and row["settle_reason"] == "lease expired"
            # what the last heartbeat proved was delivered, plus the prompt estimate
            assert row["delivered_tokens"] >= 10
            assert row["billed_tokens"] == row["prompt_estimate"] + row["delivered_tokens"]
        windows = run(query(database, "SELECT DISTINCT w.* FROM quota_windows w JOIN usage_ledger l"
                                      " ON w.id IN (l.window_id, l.week_window_id) JOIN api_keys k"
                                      " ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10]))
        assert len(windows) == 2
        for window in windows:
            assert window["reserved"] == 0
            assert window["posted"] == sum(r["billed_tokens"] for r in rows)
    finally:
        survivor.stop()


def test_live_requests_keep_their_lease_through_long_silences(database, simulator):
    """A request the upstream is still working on is never expired, streamed or not."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4", CODEPLAN_RESERVATION_LEASE="1",
                          CODEPLAN_HEARTBEAT_INTERVAL="0.25", CODEPLAN_SWEEP_INTERVAL="0.2",
                          CODEPLAN_KEEPALIVE_INTERVAL="0.3")
    try:
        key = new_user(database)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        # non-streaming: nothing comes back for 2.5 s
        slow = client.chat.completions.create(
            model="glm-4.6", messages=[{"role": "user", "content": "[[sim ttft=2500 tokens=3 reasoning=0]] a"}])
        # streaming: a 2.5 s silence mid-answer (thinking), keep-alives only
        chunks = list(client.chat.completions.create(
            model="glm-4.6", stream=True,
            messages=[{"role": "user", "content": "[[sim fault=silence silence=2.5 tokens=6 reasoning=0]] b"}]))
        wait_settled(database)
        rows = run(query(database, "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.api_key_id"
                                   " WHERE k.prefix = $1 ORDER BY l.created_at", key[:10]))
        assert [(r["state"], r["estimated"]) for r in rows] == [("posted", False), ("posted", False)]
        assert rows[0]["completion_tokens"] == slow.usage.completion_tokens
        assert rows[1]["completion_tokens"] == chunks[-1].usage.completion_tokens
    finally:
        server.stop()
