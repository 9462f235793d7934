"""A database host that vanishes without a reset (tests/faults/partition.py: a veth link taken
down, every packet dropped): a connection to it fails within CODEPLAN_DB_DEAD_AFTER, whether it
was sending, waiting for an answer or listening, and so does opening one; the ledger's tick is
given up, its admission answered with the error, and the ledger serves again once the link is
back. Without the socket options the same query is still waiting when the test gives up on it."""
from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid

import asyncpg
import pytest

from bridge.ports import Reservation
from service import db
from service.ledger import Ledger

from ..conftest import CODEPLAN, ROOT, TcpProxy, base_env, new_plan, new_user, pg_socket, query, run, start_bridge
from .partition import Partition

DEAD_AFTER = 2.0
# the kernel's timers: a probe's interval, a retransmission's backoff, on a busy machine
SLACK = 3.0
# every wait is bounded beyond what the assertions allow, so a regression fails, never hangs
PATIENCE = DEAD_AFTER + SLACK + 3


@pytest.fixture
def partition(database):
    link = Partition(pg_socket(database))
    yield link
    link.close()


def test_a_query_to_a_vanished_host_fails_within_dead_after_and_without_the_options_waits(database, partition):
    url = partition.url(database)

    async def scenario() -> float:
        kept = await db.connect(url, dead_after=DEAD_AFTER)
        plain = await asyncpg.connect(url)  # the kernel's defaults: ~15 minutes of retransmissions
        assert await kept.fetchval("SELECT 1") == 1 and await plain.fetchval("SELECT 1") == 1
        partition.cut()
        started = time.monotonic()
        with pytest.raises(db.UNAVAILABLE):
            await asyncio.wait_for(kept.fetchval("SELECT 2"), PATIENCE)
        kept_failed = time.monotonic() - started
        with pytest.raises(TimeoutError):  # still waiting, the whole PATIENCE
            await asyncio.wait_for(plain.fetchval("SELECT 2"), PATIENCE)
        plain.terminate()
        return kept_failed

    kept_failed = run(scenario())
    assert DEAD_AFTER * 0.5 <= kept_failed <= DEAD_AFTER + SLACK, kept_failed


def test_a_slow_statement_a_long_lock_wait_and_a_quiet_connection_are_not_a_vanished_host(database, partition):
    """The options' false alarm would be a healthy server that is slow to answer: the probes are
    answered by its kernel however long PostgreSQL takes. Each wait here is over twice the bound."""
    url = partition.url(database)
    long = 2 * DEAD_AFTER + 1

    async def scenario() -> None:
        slow = await db.connect(url, dead_after=DEAD_AFTER)
        holder = await db.connect(url, dead_after=DEAD_AFTER)
        waiter = await db.connect(url, dead_after=DEAD_AFTER)
        await slow.execute(f"SELECT pg_sleep({long})")
        await asyncio.sleep(long)  # idle
        assert await slow.fetchval("SELECT 1") == 1
        await holder.execute("BEGIN; SELECT pg_advisory_xact_lock(4242)")
        waiting = asyncio.ensure_future(waiter.execute("SELECT pg_advisory_xact_lock(4242)"))
        await asyncio.sleep(long)
        assert not waiting.done()
        await holder.execute("COMMIT")
        assert await asyncio.wait_for(waiting, PATIENCE) == "SELECT 1"
        for conn in (slow, holder, waiter):
            await conn.close()

    run(scenario())


def test_a_connection_waiting_for_an_answer_or_listening_learns_its_host_is_gone(database, partition):
    """No byte of ours is unacknowledged here (the statement was, and LISTEN sends nothing):
    keepalive probes find the silence."""
    url = partition.url(database)

    async def scenario() -> tuple[float, float]:
        waiting = await db.connect(url, dead_after=DEAD_AFTER)
        listening = await db.connect(url, dead_after=DEAD_AFTER)
        lost = asyncio.Event()
        listening.add_termination_listener(lambda _conn: lost.set())
        await listening.add_listener("anything", lambda *_: None)
        sleep = asyncio.ensure_future(waiting.fetchval("SELECT pg_sleep(60)"))
        await asyncio.sleep(0.5)  # sent and acknowledged
        partition.cut()
        started = time.monotonic()
        with pytest.raises(db.UNAVAILABLE):
            await asyncio.wait_for(sleep, PATIENCE)
        waited = time.monotonic() - started
        await asyncio.wait_for(lost.wait(), PATIENCE)
        return waited, time.monotonic() - started

    waited, listened = run(scenario())
    assert waited <= DEAD_AFTER + SLACK, waited
    assert listened <= DEAD_AFTER + SLACK + 1, listened


def test_opening_a_connection_to_a_vanished_host_takes_at_most_dead_after(database, partition):
    """asyncpg's own bound is 60 s; the pool's attempts and a connection of its own are held to
    dead_after each."""
    url = partition.url(database)

    async def scenario() -> tuple[float, float]:
        pool = await db.create_pool(url, size=1, dead_after=DEAD_AFTER)
        try:
            partition.cut()
            with pytest.raises(db.UNAVAILABLE):  # (not timed) the pool's one connection: given up, dropped
                async with pool.acquire() as conn:
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), PATIENCE)
            started = time.monotonic()
            with pytest.raises(TimeoutError):  # the pool opens another
                async with pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
            pooled = time.monotonic() - started
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await db.connect(url, dead_after=DEAD_AFTER)
            return pooled, time.monotonic() - started
        finally:
            pool.terminate()

    pooled, own = run(scenario())
    # asyncpg's pool keeps its floor of connections with a task of its own, which takes the
    # dropped connection's place first: the acquire opens one after that one's attempt
    assert DEAD_AFTER * 0.9 <= pooled <= 2 * DEAD_AFTER + 1, pooled
    assert DEAD_AFTER * 0.9 <= own <= DEAD_AFTER + 1, own


def test_the_ledgers_tick_is_given_up_and_the_ledger_serves_again_after_the_partition(database, partition):
    """The admission of a tick sent into the partition gets the error within two connection
    timeouts (the batch, then once more as a whole on another connection), not one per element;
    settlements queued behind it too; once the link is back, the next admission is served."""
    plan = new_plan(database, window=1_000_000, weekly=3_000_000)
    new_user(database, plan)
    [row] = run(query(database, "SELECT s.id AS sub, k.id AS key FROM subscriptions s JOIN api_keys k"
                                " ON k.account_id = s.account_id WHERE s.plan_id = $1", plan))
    url = partition.url(database)

    def reservation() -> Reservation:
        return Reservation(entry_id=uuid.uuid4(), subscription_id=row["sub"], api_key_id=row["key"],
                           surface="chat", model="glm-4.6", prompt_estimate=100, reserve=200, held=200)

    async def scenario() -> tuple[float, str]:
        pool = await db.create_pool(url, size=4, dead_after=DEAD_AFTER)
        ledger = Ledger(pool, lease_seconds=60)
        try:
            assert (await ledger.admit(reservation())).admitted
            partition.cut()
            started = time.monotonic()
            answers = await asyncio.wait_for(asyncio.gather(
                *(ledger.admit(reservation()) for _ in range(5)), return_exceptions=True), 2 * PATIENCE)
            took = time.monotonic() - started
            assert all(isinstance(a, db.UNAVAILABLE) for a in answers), answers
            partition.heal()
            for _ in range(20):  # the pool's connections that saw the partition fail first
                try:
                    return took, (await ledger.admit(reservation())).outcome
                except db.UNAVAILABLE:
                    await asyncio.sleep(0.2)
            raise AssertionError("the ledger did not serve again")
        finally:
            pool.terminate()

    took, outcome = run(scenario())
    assert took <= 2 * (DEAD_AFTER + SLACK), took
    assert outcome == "admitted"


def _keepalive_seconds(line: str) -> float | None:
    """The keepalive timer `ss -o` shows for a socket (`timer:(keepalive,1min2sec,0)`), if any."""
    found = re.search(r"timer:\(keepalive,(?:(\d+)min)?(?:(\d+)sec)?(?:(\d+)ms)?", line)
    if found is None:
        return None
    minutes, seconds, millis = (int(g or 0) for g in found.groups())
    return minutes * 60 + seconds + millis / 1000


def test_the_services_database_connections_carry_the_bound_it_is_configured_with(database, simulator):
    """CODEPLAN_DB_DEAD_AFTER reaches every TCP connection `codeplan run` opens to PostgreSQL
    (its pool's, the live page's LISTEN): seen from outside, as the kernel's keepalive timer on
    each socket (`ss -o`). 120 s gives probes after 60 s of silence, unlike the default's 15 s
    (30) or no timer at all (no options). No partition needed: a TCP proxy on 127.0.0.1."""
    proxy = TcpProxy(pg_socket(database))
    server = start_bridge(proxy.url(database), simulator.url + "/api/coding/paas/v4",
                          CODEPLAN_DB_DEAD_AFTER="120")
    try:
        assert server.process is not None
        deadline = time.monotonic() + 10
        while True:
            listed = subprocess.run(["ss", "-tnopH", "state", "established", f"( dport = :{proxy.port} )"],
                                    check=True, capture_output=True, text=True).stdout
            ours = [line for line in listed.splitlines() if f"pid={server.process.pid}," in line]
            if len(ours) >= 3 or time.monotonic() > deadline:  # two pooled at least, and LISTEN
                break
            time.sleep(0.2)
        assert len(ours) >= 3, listed
        timers = [_keepalive_seconds(line) for line in ours]
        assert all(t is not None and 15 < t <= 60 for t in timers), ours
    finally:
        server.stop()
        proxy.close()


@pytest.mark.parametrize("command", [["users", "create", "--email", "silent@example.com"],
                                     ["keys", "revoke", "--prefix", "cp_nothing"]])
def test_a_one_shot_command_gives_up_on_a_silent_database_in_its_bound(database, command):
    """The CLI's own connections (the migration runner's, a command's) take CODEPLAN_DB_DEAD_AFTER
    too, and say so in one line: here a server that accepts the connection and never answers (a
    frozen proxy), given up in 2 s, where the default bound is 30."""
    proxy = TcpProxy(pg_socket(database))
    proxy.freeze()
    try:
        started = time.monotonic()
        done = subprocess.run(CODEPLAN + command, env=base_env(
            CODEPLAN_DATABASE_URL=proxy.url(database), CODEPLAN_DB_DEAD_AFTER="2"),
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert time.monotonic() - started < 15
        assert done.stderr.strip().splitlines()[-1] == (
            "codeplan: the database did not answer in 2 s (CODEPLAN_DB_DEAD_AFTER)"), done.stderr
        assert "Traceback" not in done.stderr and "postgresql://" not in done.stderr
    finally:
        proxy.close()
