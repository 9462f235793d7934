"""The tick baton (service/tick_baton.py): the ledger ticks of `codeplan run --workers N` take
turns, so each worker's batch is cut after the other's tick, not beside it. Against the real
PostgreSQL (two batons are two workers: two sessions), and the ticker's use of it against the
model of tests/test_ledger_ticker.py. `codeplan run --workers 3` holding it end to end is in
tests/test_operations.py."""
from __future__ import annotations

import asyncio
import time

import asyncpg

from service.ledger import _Ticker
from service.tick_baton import TickBaton
from tests.conftest import query
from tests.test_ledger_ticker import Model, _reservation


async def _settles(awaitable, within: float = 0.3) -> bool:
    """Whether `awaitable` (a task) finishes within `within` seconds (it keeps running if not)."""
    done, _ = await asyncio.wait({awaitable}, timeout=within)
    return bool(done)


async def test_a_second_worker_waits_for_the_baton_and_gets_it_when_given(fresh_database):
    first, second = TickBaton(fresh_database, patience=5), TickBaton(fresh_database, patience=5)
    try:
        assert await first.take()
        waiting = asyncio.ensure_future(second.take())
        assert not await _settles(waiting)  # held: the second tick waits
        first.give()
        assert await _settles(waiting, 5) and waiting.result() is True
        second.give()
    finally:
        await first.close()
        await second.close()


async def test_a_worker_that_gives_the_baton_and_asks_again_queues_behind_the_one_waiting(fresh_database):
    # (flock or a pipe would let the giver take it straight back while it has work: PostgreSQL
    # grants an advisory lock in the order it was asked for)
    first, second = TickBaton(fresh_database, patience=5), TickBaton(fresh_database, patience=5)
    try:
        assert await first.take()
        theirs = asyncio.ensure_future(second.take())
        assert not await _settles(theirs)
        first.give()
        again = asyncio.ensure_future(first.take())
        assert await _settles(theirs, 5) and theirs.result() is True
        assert not await _settles(again)  # the second worker's tick is in flight now
        second.give()
        assert await _settles(again, 5) and again.result() is True
        first.give()
    finally:
        await first.close()
        await second.close()


async def test_a_baton_held_past_patience_means_a_tick_without_it(fresh_database):
    holder, other = TickBaton(fresh_database, patience=5), TickBaton(fresh_database, patience=0.05)
    try:
        assert await holder.take()
        started = time.monotonic()
        assert await other.take() is False
        assert time.monotonic() - started < 2.0
        holder.give()
        assert await other.take() is True  # the same connection takes it once free
        other.give()
    finally:
        await holder.close()
        await other.close()


async def test_a_worker_that_dies_holding_the_baton_stalls_nobody(fresh_database):
    dying, other = TickBaton(fresh_database, patience=5), TickBaton(fresh_database, patience=5)
    try:
        assert await dying.take()
        waiting = asyncio.ensure_future(other.take())
        assert not await _settles(waiting)
        # the holder's process dies: its session ends (here: ended from outside, as a crash would)
        await query(fresh_database, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                    " WHERE application_name = 'codeplan tick baton' AND state = 'idle in transaction'")
        assert await _settles(waiting, 5) and waiting.result() is True
        other.give()
    finally:
        await dying.close()
        await other.close()


async def test_no_database_means_ticks_without_the_baton_and_no_error(pg_url):
    baton = TickBaton(pg_url.rsplit("/", 1)[0] + "/no_such_database", patience=5)
    assert await baton.take() is False
    started = time.monotonic()
    assert await baton.take() is False  # not tried again at once
    assert time.monotonic() - started < 0.05
    baton.give()  # nothing held: nothing to give, and no error
    await baton.close()


async def test_a_given_baton_is_free_for_others_even_before_the_next_take(fresh_database):
    first = TickBaton(fresh_database, patience=5)
    try:
        assert await first.take()
        first.give()
        await asyncio.sleep(0.2)
        rows = await query(fresh_database, "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted")
        assert rows[0]["n"] == 0
    finally:
        await first.close()


class _FakeBaton:
    """Another worker's tick in flight until `free` is set."""

    def __init__(self, grant: bool = True) -> None:
        self.free = asyncio.Event()
        self.grant = grant
        self.taken = self.given = 0

    async def take(self) -> bool:
        await self.free.wait()
        self.taken += 1
        return self.grant

    def give(self) -> None:
        self.given += 1


async def test_the_ticker_cuts_its_batch_once_it_has_the_baton():
    model, baton = Model(cap=10, window=10_000), _FakeBaton()
    ticker = _Ticker(model.tick, lambda reservation, admission: None, baton=baton)  # type: ignore[arg-type]
    answers = [ticker.admit(_reservation("first"))]
    await asyncio.sleep(0.01)  # the other worker's tick is still in flight
    answers += [ticker.admit(_reservation(name)) for name in ("second", "third")]
    baton.free.set()
    assert all(a.admitted for a in await asyncio.gather(*answers))
    assert model.ticks == [([], ["first", "second", "third"])]  # one tick, cut after the wait
    assert (baton.taken, baton.given) == (1, 1)


async def test_a_tick_without_the_baton_gives_nothing_back():
    model, baton = Model(cap=10, window=10_000), _FakeBaton(grant=False)
    baton.free.set()
    ticker = _Ticker(model.tick, lambda reservation, admission: None, baton=baton)  # type: ignore[arg-type]
    assert (await ticker.admit(_reservation("first"))).admitted
    assert (baton.taken, baton.given) == (1, 0)


async def test_a_failing_tick_gives_the_baton_back():
    baton = _FakeBaton()
    baton.free.set()

    async def broken(settles, admits, plan_only):
        raise asyncpg.InterfaceError("connection lost")

    ticker = _Ticker(broken, lambda reservation, admission: None, baton=baton)  # type: ignore[arg-type]
    try:
        await ticker.admit(_reservation("first"))
    except asyncpg.InterfaceError:
        pass
    # the tick and the element retried alone: every baton taken was given back
    assert baton.taken >= 1 and baton.taken == baton.given
