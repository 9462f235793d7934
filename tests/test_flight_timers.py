"""A flight's two timers: the lease keeper beats, and the lifetime cap ends the request at its
moment whether it comes before the first beat or after several (its timer is set lazily, at the
first beat; bridge/flight.py). A recording ledger stands in for the database: what is asserted
is what the flight asks of it and when."""
from __future__ import annotations

import asyncio
import time
import uuid

from bridge.flight import Flight, Flights
from bridge.metering import Calibration
from bridge.ports import Principal, Settlement
from bridge.settings import BridgeSettings

PRINCIPAL = Principal(account_id=1, api_key_id=1, subscription_id=1, plan_id="p", models=())


class RecordingLedger:
    def __init__(self) -> None:
        self.beats: list[float] = []
        self.settled: list[tuple[float, Settlement]] = []

    async def heartbeat(self, entry_id: uuid.UUID, delivered_tokens: int) -> bool:
        self.beats.append(time.monotonic())
        return True

    def settle(self, settlement: Settlement) -> "asyncio.Future[int | None]":
        self.settled.append((time.monotonic(), settlement))
        written = asyncio.get_running_loop().create_future()
        written.set_result(0)
        return written


def _flight(settings: BridgeSettings, ledger: RecordingLedger):
    flights = Flights(settings, ledger, Calibration(), "test")
    return flights, Flight(flights, entry=uuid.uuid4(), principal=PRINCIPAL, surface="chat", model="glm-4.6",
                           shown_model="glm-4.6", prompt_estimate=10, raw_prompt=10, kind="ascii",
                           started=time.monotonic())


async def _ended(flight, within: float) -> None:
    deadline = time.monotonic() + within
    while not flight.ended and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_the_cap_ends_a_request_after_several_beats_at_its_moment():
    ledger = RecordingLedger()
    flights, flight = _flight(BridgeSettings(heartbeat_interval=0.1, max_request_seconds=0.55), ledger)
    born = time.monotonic()
    await _ended(flight, 5)
    await flights.land()
    assert flight.ended
    took = ledger.settled[0][0] - born
    assert 0.5 <= took < 2.5, took
    assert len(ledger.beats) >= 3  # the keeper beat on until the cap
    assert ledger.settled[0][1].reason == "lifetime cap reached"
    assert ledger.settled[0][1].state == "voided"  # nothing was accepted upstream


async def test_a_cap_shorter_than_a_beat_ends_the_request_before_any_beat():
    ledger = RecordingLedger()
    flights, flight = _flight(BridgeSettings(heartbeat_interval=5, max_request_seconds=0.2), ledger)
    await _ended(flight, 4)
    await flights.land()
    assert flight.ended
    assert ledger.beats == []
    assert ledger.settled[0][1].reason == "lifetime cap reached"


async def test_a_request_that_ends_first_leaves_no_timer_behind():
    ledger = RecordingLedger()
    flights, flight = _flight(BridgeSettings(heartbeat_interval=0.1, max_request_seconds=0.3), ledger)
    flight.end("complete")
    await asyncio.sleep(0.6)
    await flights.land()
    assert ledger.beats == []
    assert [s.reason for _, s in ledger.settled] == ["complete"]
