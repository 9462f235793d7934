"""Scarce upstream slots are shared in turn by account: one account with many requests queued
cannot make another wait behind all of them (bridge/upstreams.py, `FairQueue`)."""
from __future__ import annotations

import asyncio
import uuid

import httpx

from bridge.upstreams import FairQueue

from .conftest import new_plan, new_user, start_bridge, wait_settled


async def test_waiters_take_turns_by_account_and_a_leaver_passes_its_turn_on():
    queue = FairQueue()
    slots = asyncio.Semaphore(0)
    order: list[tuple[str, int]] = []

    async def wait(account: str, i: int) -> None:
        turn = queue.join(account)
        served = False
        try:
            await turn
            await slots.acquire()
            served = True
            order.append((account, i))
        finally:
            queue.leave(account, turn, served=served)

    tasks = [asyncio.create_task(wait("a", i)) for i in range(6)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(wait("b", i)) for i in range(2)] + [asyncio.create_task(wait("c", 0))]
    await asyncio.sleep(0)
    tasks[0].cancel()  # the head leaves before it gets a slot: the next in turn takes over
    await asyncio.sleep(0)
    for _ in range(8):
        slots.release()
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [("a", 1), ("b", 0), ("c", 0), ("a", 2), ("b", 1), ("a", 3), ("a", 4), ("a", 5)]
    assert len(queue) == 0


def _ask(client: httpx.AsyncClient, url: str, key: str, label: str, done: list[str]):
    async def one() -> None:
        response = await client.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                     json={"model": "glm-4.6", "max_tokens": 50, "messages": [{
                                         "role": "user",
                                         "content": f"[[sim ttft=400 tokens=3 reasoning=0]] {uuid.uuid4().hex}"}]})
        assert response.status_code == 200, response.text
        done.append(label)
    return one()


async def test_one_account_cannot_starve_another_of_a_scarce_upstream_key(database, simulator):
    """One upstream key serving one request at a time. Account A queues 8 requests of ~0.4 s;
    then B sends 2. First come, first served, B would wait for all of A's (~3 s); in turn by
    account, each of B's waits for at most one of A's."""
    server = start_bridge(database, simulator.url + "/api/coding/paas/v4",
                          CODEPLAN_UPSTREAM_KEYS=f"fair-{uuid.uuid4().hex[:6]}", CODEPLAN_UPSTREAM_CONCURRENCY="1")
    try:
        plan = new_plan(database, window=10**9)
        hog, other = new_user(database, plan), new_user(database, plan)
        done: list[str] = []
        async with httpx.AsyncClient(timeout=120) as client:
            hogging = [asyncio.ensure_future(_ask(client, server.url, hog, f"a{i}", done)) for i in range(8)]
            while not done:  # the first is served: the other seven wait for the slot
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            others = [asyncio.ensure_future(_ask(client, server.url, other, f"b{i}", done)) for i in range(2)]
            await asyncio.gather(*hogging, *others)
        await asyncio.to_thread(wait_settled, database)
        first, second = [i for i, label in enumerate(done) if label.startswith("b")]
        # B's first is served after at most two more of A's (the one in flight, then A's turn),
        # its second after one more; first come, first served would put both after all eight
        assert first <= 4 and second <= 6, done
        assert sum(1 for label in done[second:] if label.startswith("a")) >= 2, done
    finally:
        server.stop()
