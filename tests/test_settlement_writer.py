"""The settlement writer (bridge/flight.py `Flights`): a settlement is queued with the ledger and
its answer taken by a callback, with no task of its own. A database blip is retried with
backoff until the write lands, once; a settlement still failing near its lease's end is left to
the sweeper; shutdown (`land`) waits for the writes in flight and no longer. A scripted ledger
stands in for the database: what is asserted is what the flights ask of it, and when."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

from bridge.flight import Flight, Flights
from bridge.metering import Calibration
from bridge.ports import Principal, Settlement
from bridge.settings import BridgeSettings

PRINCIPAL = Principal(account_id=1, api_key_id=1, subscription_id=1, plan_id="p", models=())


class ScriptedLedger:
    """Fails the first `failures` writes; answers each write after `delay` seconds."""

    def __init__(self, failures: int = 0, delay: float = 0.0) -> None:
        self.failures = failures
        self.delay = delay
        self.writes: list[tuple[float, Settlement]] = []
        self.raise_at_once = False  # the port itself raises, as a coroutine's call never did

    def settle(self, settlement: Settlement) -> "asyncio.Future[int | None]":
        loop = asyncio.get_running_loop()
        self.writes.append((time.monotonic(), settlement))
        if self.raise_at_once:
            raise ConnectionResetError("no database")
        written = loop.create_future()
        if len(self.writes) <= self.failures:
            loop.call_later(self.delay, written.set_exception, ConnectionResetError("database gone"))
        else:
            loop.call_later(self.delay, written.set_result, 42)
        return written

    async def heartbeat(self, entry_id: uuid.UUID, delivered_tokens: int) -> bool:
        return True


def _flights(ledger: ScriptedLedger, **settings) -> Flights:
    return Flights(BridgeSettings(**settings), ledger, Calibration(), "test")


def _flight(flights: Flights) -> Flight:
    return Flight(flights, entry=uuid.uuid4(), principal=PRINCIPAL, surface="chat", model="glm-4.6",
                  shown_model="glm-4.6", prompt_estimate=10, raw_prompt=10, kind="ascii",
                  started=time.monotonic())


async def test_a_blip_is_retried_with_backoff_until_the_write_lands_once(caplog):
    ledger = ScriptedLedger(failures=2)
    flights = _flights(ledger)
    flight = _flight(flights)
    with caplog.at_level(logging.INFO):
        flight.end("complete")
        assert flights.in_flight == 1  # the write counts until it lands
        await asyncio.wait_for(flights.land(), 5)
    assert flights.in_flight == 0
    times = [t for t, _ in ledger.writes]
    assert len(times) == 3 and {s.entry_id for _, s in ledger.writes} == {flight.entry}
    # 0.05 s, then 0.1 s: doubling
    assert 0.04 <= times[1] - times[0] < 0.5 and times[2] - times[1] >= 0.09, times
    retried = [r for r in caplog.records if r.getMessage() == "settlement failed; retrying"]
    assert len(retried) == 2
    lines = [r for r in caplog.records if r.name == "codeplan.access"]
    assert len(lines) == 1 and lines[0].outcome == "settled" and lines[0].billed == 42


async def test_a_write_still_failing_near_the_lease_end_is_left_to_the_sweeper(caplog):
    ledger = ScriptedLedger(failures=1000)
    # a lease of 2.2 s and a margin of 2 s: the first retry (0.05 s) fits, a later one does not
    flights = _flights(ledger, reservation_lease=2.2)
    flight = _flight(flights)
    with caplog.at_level(logging.INFO):
        flight.end("complete")
        await asyncio.wait_for(flights.land(), 5)
    assert flights.in_flight == 0
    assert 2 <= len(ledger.writes) < 10
    assert any(r.getMessage() == "settlement not written; the sweeper will expire the entry"
               for r in caplog.records)
    lines = [r for r in caplog.records if r.name == "codeplan.access"]
    assert len(lines) == 1 and lines[0].outcome == "left_to_sweeper"


async def test_land_waits_for_writes_in_flight_and_no_longer(caplog):
    slow = ScriptedLedger(delay=0.3)
    flights = _flights(slow)
    for _ in range(3):
        _flight(flights).end("complete")
    started = time.monotonic()
    await flights.land(timeout=5)
    assert 0.25 <= time.monotonic() - started < 2 and flights.in_flight == 0

    stuck = ScriptedLedger(delay=60)
    flights = _flights(stuck)
    _flight(flights).end("complete")
    started = time.monotonic()
    await flights.land(timeout=0.2)
    assert time.monotonic() - started < 1 and flights.in_flight == 1
    left = [r for r in caplog.records if r.getMessage().startswith("settlements not written at shutdown")]
    assert len(left) == 1 and left[0].count == 1  # said, for the operator: the sweeper's now


async def test_a_settlement_takes_no_task_of_its_own():
    slow = ScriptedLedger(delay=0.2)
    flights = _flights(slow)
    flight = _flight(flights)
    before = asyncio.all_tasks()
    flight.end("complete")
    assert asyncio.all_tasks() == before  # queued with the ledger, answered by a callback
    assert flights.in_flight == 1
    await flights.land(timeout=5)
    assert flights.in_flight == 0 and len(slow.writes) == 1


async def test_a_port_that_raises_at_once_is_retried_like_a_failed_write():
    ledger = ScriptedLedger()
    ledger.raise_at_once = True
    flights = _flights(ledger)
    _flight(flights).end("complete")
    await asyncio.sleep(0.2)
    assert len(ledger.writes) >= 2 and flights.in_flight == 1  # retried, still owed
    ledger.raise_at_once = False
    await asyncio.wait_for(flights.land(), 5)
    assert flights.in_flight == 0


async def test_an_abandoned_admissions_void_is_retried_like_a_settlement(caplog):
    """`void_abandoned` (an admission nobody forwards): left unwritten, the sweeper would expire
    the entry and bill its prompt estimate for an answer nobody got, so a blip is retried with
    the same backoff, until written or the lease is about to end."""
    from bridge.flight import void_abandoned
    from bridge.ports import Reservation
    reservation = Reservation(entry_id=uuid.uuid4(), subscription_id=7, api_key_id=1, surface="chat",
                              model="glm-4.6", prompt_estimate=10, reserve=20, held=20)
    ledger = ScriptedLedger(failures=2)
    void_abandoned(ledger, reservation, lease=60)  # type: ignore[arg-type]
    while len(ledger.writes) < 3:
        await asyncio.sleep(0.01)
    assert {(s.entry_id, s.state, s.subscription_id) for _, s in ledger.writes} == {
        (reservation.entry_id, "voided", 7)}
    await asyncio.sleep(0.3)
    assert len(ledger.writes) == 3  # written: no more tries

    failing = ScriptedLedger(failures=1000)
    given_up: list[logging.LogRecord] = []
    with caplog.at_level(logging.DEBUG):
        void_abandoned(failing, reservation, lease=2.5)  # type: ignore[arg-type]
        for _ in range(500):
            given_up = [r for r in caplog.records
                        if r.getMessage() == "settlement not written; the sweeper will expire the entry"]
            if given_up:
                break
            await asyncio.sleep(0.01)
    assert 2 <= len(failing.writes) < 10
    assert len(given_up) == 1 and given_up[0].state == "voided" and given_up[0].levelno == logging.WARNING
    # its retries quietly: every admission that failed in an outage has a void, and its
    # request's warning already says the database was away
    retried = [r for r in caplog.records if r.getMessage() == "settlement failed; retrying"]
    assert retried and all(r.levelno == logging.DEBUG for r in retried)
