"""The tick baton (service/tick_baton.py): the ledger ticks of `codeplan run --workers N` take
turns, so each worker's batch is cut after the other's tick, not beside it. Against the real
PostgreSQL (two batons are two workers: two sessions), and the ticker's use of it against the
model of tests/test_ledger_ticker.py. `codeplan run --workers 3` holding it end to end is in
tests/test_operations.py."""
from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from service import db, tick_baton
from service.ledger import _Ticker
from service.tick_baton import _CLASS, TickBaton
from tests.conftest import TcpProxy, pg_socket, query
from tests.test_ledger_ticker import Model, _reservation

KEY = 12345  # a supervisor's


async def _baton(url: str, key: int = KEY, **options) -> TickBaton:
    baton = TickBaton(url, key, **{"patience": 5.0, **options})
    await baton.open()
    return baton


async def _finishes(task: asyncio.Future, within: float = 0.3) -> bool:
    """Whether `task` finishes within `within` seconds (it keeps running if not)."""
    done, _ = await asyncio.wait({task}, timeout=within)
    return bool(done)


async def _batons_held(url: str) -> int:
    rows = await query(url, "SELECT count(*) AS n FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                            " WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()"
                            " AND l.classid = $1", _CLASS)
    return rows[0]["n"]


async def _free(url: str, within: float = 5.0) -> None:
    """Until the baton's COMMIT, sent without waiting, has landed."""
    deadline = time.monotonic() + within
    while await _batons_held(url):
        assert time.monotonic() < deadline, "the baton was never given back"
        await asyncio.sleep(0.01)


async def _sessions(url: str) -> int:
    rows = await query(url, "SELECT count(*) AS n FROM pg_stat_activity"
                            " WHERE application_name = 'codeplan tick baton' AND datname = current_database()")
    return rows[0]["n"]


async def test_a_second_worker_waits_for_the_baton_and_gets_it_when_given(fresh_database):
    first, second = await _baton(fresh_database), await _baton(fresh_database)
    try:
        assert await first.take()
        waiting = asyncio.ensure_future(second.take())
        assert not await _finishes(waiting)  # held: the second tick waits
        first.give()
        assert await _finishes(waiting, 5) and waiting.result() is True
        second.give()
    finally:
        await first.close()
        await second.close()


async def test_a_worker_that_gives_the_baton_and_asks_again_queues_behind_the_one_waiting(fresh_database):
    # (flock or a pipe would let the giver take it straight back while it has work: PostgreSQL
    # grants an advisory lock in the order it was asked for)
    first, second = await _baton(fresh_database), await _baton(fresh_database)
    try:
        assert await first.take()
        theirs = asyncio.ensure_future(second.take())
        assert not await _finishes(theirs)
        first.give()
        again = asyncio.ensure_future(first.take())
        assert await _finishes(theirs, 5) and theirs.result() is True
        assert not await _finishes(again)  # the second worker's tick is in flight now
        second.give()
        assert await _finishes(again, 5) and again.result() is True
        first.give()
    finally:
        await first.close()
        await second.close()


async def test_a_baton_held_past_patience_means_ticks_without_it_for_a_rest(fresh_database, caplog):
    holder = await _baton(fresh_database)
    other = await _baton(fresh_database, patience=0.5, rest=1.0)
    try:
        assert await holder.take()
        started = time.monotonic()
        assert await other.take() is False
        assert time.monotonic() - started < 2.0
        assert "tick baton not had in time" in caplog.text  # an operator sees it
        # resting: the next ticks go without at once, not `patience` each
        started = time.monotonic()
        assert await other.take() is False
        assert time.monotonic() - started < 0.1
        holder.give()
        await _free(fresh_database)
        await asyncio.sleep(1.0)
        assert await other.take() is True  # the same connection, after its rest
        other.give()
    finally:
        await holder.close()
        await other.close()


async def test_a_worker_that_dies_holding_the_baton_stalls_nobody(fresh_database):
    dying, other = await _baton(fresh_database), await _baton(fresh_database)
    try:
        assert await dying.take()
        waiting = asyncio.ensure_future(other.take())
        assert not await _finishes(waiting)
        # the holder's process dies: its session ends (here: ended from outside, as a crash would)
        await query(fresh_database, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                    " WHERE application_name = 'codeplan tick baton' AND datname = current_database()"
                                    " AND state = 'idle in transaction'")
        assert await _finishes(waiting, 5) and waiting.result() is True
        other.give()
    finally:
        await dying.close()
        await other.close()


async def test_the_migrations_lock_and_another_runs_baton_are_other_locks(fresh_database):
    # a migration in progress (service/db.py's lock, one-integer key space) and another
    # `codeplan run` on this database (another host: another key) leave this baton free
    migrating = await asyncpg.connect(fresh_database)
    theirs, ours = await _baton(fresh_database, key=KEY + 1), await _baton(fresh_database, patience=0.05)
    try:
        await migrating.execute("SELECT pg_advisory_lock($1)", db._MIGRATION_LOCK)
        assert await theirs.take()
        assert await ours.take() is True
        ours.give()
        theirs.give()
    finally:
        await migrating.close()
        await theirs.close()
        await ours.close()


async def test_no_database_means_ticks_without_the_baton_and_no_error(pg_url):
    baton = await _baton(pg_url.rsplit("/", 1)[0] + "/no_such_database")
    started = time.monotonic()
    assert await baton.take() is False
    assert await baton.take() is False
    assert time.monotonic() - started < 0.05
    assert baton._connecting is None  # resting: no connection tried again at once
    baton.give()  # nothing held: nothing to give, and no error
    await baton.close()


async def test_a_given_baton_is_free_for_others_before_the_next_take(fresh_database):
    first = await _baton(fresh_database)
    try:
        assert await first.take()
        assert await _batons_held(fresh_database) == 1
        first.give()
        await _free(fresh_database)
    finally:
        await first.close()


async def test_a_closed_baton_takes_nothing_and_opens_no_connection(fresh_database):
    baton = await _baton(fresh_database)
    assert await _sessions(fresh_database) == 1
    assert await baton.take()
    baton.give()
    await baton.close()
    assert await baton.take() is False
    await asyncio.sleep(0.1)
    assert await _sessions(fresh_database) == 0
    assert await _batons_held(fresh_database) == 0


async def test_a_take_cancelled_while_waiting_leaves_no_lock_behind(fresh_database):
    holder, cancelled, third = await _baton(fresh_database), await _baton(fresh_database), await _baton(fresh_database)
    try:
        assert await holder.take()
        waiting = asyncio.ensure_future(cancelled.take())
        assert not await _finishes(waiting)
        waiting.cancel()
        holder.give()
        # the cancelled waiter's session is ended, so the lock does not stay with it
        assert await third.take() is True
        third.give()
    finally:
        await holder.close()
        await cancelled.close()
        await third.close()


# ---- a database that stops answering: every wait has its bound -----------------------------------

@pytest.fixture
def proxy(fresh_database):
    """The test database behind a proxy that can stop passing bytes (tests/conftest.py)."""
    proxy = TcpProxy(pg_socket(fresh_database))
    yield proxy
    proxy.close()


async def _timed(awaitable) -> tuple[object, float]:
    """(its result, the seconds it took); a test that would hang fails after 10 s instead."""
    started = time.monotonic()
    result = await asyncio.wait_for(awaitable, 10)
    return result, time.monotonic() - started


async def _only_other_session_left(url: str) -> None:
    """Until the baton's given-up session has ended in PostgreSQL (the other worker's is left)."""
    deadline = time.monotonic() + 5
    while await _sessions(url) != 1:
        assert time.monotonic() < deadline, "the connection given up still has its session"
        await asyncio.sleep(0.02)


async def _taken_again(baton: TickBaton) -> None:
    """Once the database answers again, the baton is had again (after its rest, on a new
    connection made in the background), and given back."""
    deadline = time.monotonic() + 5
    while not await baton.take():
        assert time.monotonic() < deadline, "the baton never came back once the database answered"
        await asyncio.sleep(0.05)
    baton.give()


async def test_a_take_the_database_never_answers_costs_the_tick_its_bound(fresh_database, proxy, caplog):
    baton = await _baton(proxy.url(fresh_database), patience=0.2, rest=0.3)
    other = await _baton(fresh_database)
    try:
        assert await baton.take()
        baton.give()
        await _free(fresh_database)
        await asyncio.wait({baton._giving})  # its COMMIT answered: the next take sends the lock
        proxy.freeze()
        # the lock's statement goes out and nothing comes back: the tick goes without it after
        # patience + slack (0.7 s), and the connection is given up
        taken, seconds = await _timed(baton.take())
        assert taken is False and 0.6 < seconds < 2.5
        assert "tick baton connection failed" in caplog.text
        assert baton._connection is None
        taken, seconds = await _timed(baton.take())  # resting: no wait, and no new connection
        assert taken is False and seconds < 0.3 and baton._connecting is None
        proxy.thaw()
        # the session given up ends, and the baton is free for the other worker
        await _only_other_session_left(fresh_database)
        assert await other.take()
        other.give()
        await _taken_again(baton)
    finally:
        proxy.thaw()
        await baton.close()
        await other.close()


async def test_a_give_the_database_never_answers_does_not_hold_the_next_tick(fresh_database, proxy):
    baton = await _baton(proxy.url(fresh_database), patience=0.2, rest=0.3)
    other = await _baton(fresh_database)
    try:
        assert await baton.take()
        proxy.freeze()
        baton.give()  # the COMMIT goes out and is never answered
        # the next take waits for it at most its bound, then goes without the baton
        taken, seconds = await _timed(baton.take())
        assert taken is False and 0.6 < seconds < 2.5
        assert baton._connection is None
        proxy.thaw()
        # the holder's session was ended, not left holding the baton: another worker gets it
        await _only_other_session_left(fresh_database)
        taken, seconds = await _timed(other.take())
        assert taken is True
        other.give()
    finally:
        proxy.thaw()
        await baton.close()
        await other.close()


async def test_a_connection_that_never_opens_keeps_no_tick_waiting(fresh_database, proxy, monkeypatch, caplog):
    monkeypatch.setattr(tick_baton, "_CONNECT_TIMEOUT", 0.5)
    proxy.freeze()  # accepted, and then not a byte: the start-up never finishes
    baton = TickBaton(proxy.url(fresh_database), KEY, patience=0.2, rest=0.3)
    try:
        # the connection is made in the background; the ticks meanwhile go without the baton
        started = time.monotonic()
        for _ in range(3):
            taken, seconds = await _timed(baton.take())
            assert taken is False and seconds < 0.3
        assert baton._connecting is not None
        while baton._connecting is not None:  # the attempt's own bound ends it
            assert time.monotonic() - started < 3, "the connection attempt has no bound"
            await asyncio.sleep(0.02)
        assert time.monotonic() - started > 0.45
        assert "tick baton unavailable" in caplog.text
        proxy.thaw()
        await _taken_again(baton)
    finally:
        proxy.thaw()
        await baton.close()


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
    ticker = _Ticker(model.tick, lambda reservation: None, baton=baton)  # type: ignore[arg-type]
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
    ticker = _Ticker(model.tick, lambda reservation: None, baton=baton)  # type: ignore[arg-type]
    assert (await ticker.admit(_reservation("first"))).admitted
    assert (baton.taken, baton.given) == (1, 0)


async def test_a_baton_that_raises_costs_the_tick_nothing():
    class Raising(_FakeBaton):
        async def take(self) -> bool:
            raise RuntimeError("unexpected")

    model = Model(cap=10, window=10_000)
    ticker = _Ticker(model.tick, lambda reservation: None, baton=Raising())  # type: ignore[arg-type]
    answer = await asyncio.wait_for(ticker.admit(_reservation("first")), 5)
    assert answer.admitted


async def test_a_failing_tick_retried_alone_gives_the_baton_back_once():
    baton = _FakeBaton()
    baton.free.set()

    async def broken(settles, admits, plan_only):
        raise asyncpg.InterfaceError("connection lost")

    ticker = _Ticker(broken, lambda reservation: None, baton=baton)  # type: ignore[arg-type]
    try:
        await ticker.admit(_reservation("first"))
    except asyncpg.InterfaceError:
        pass
    # the tick and the element retried alone: every baton taken was given back
    assert baton.taken >= 1 and baton.taken == baton.given
