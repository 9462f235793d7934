"""The stall watch (service/app.py `_watch_stalls`): a request stuck before its admission, and a
ledger tick left unanswered, are logged once each with where they wait, so a hang says where it
is; and a ticker loop that fails answers its batch with the error rather than leaving its callers
waiting. The journey against a ledger that hands out its futures (tests/test_admission_unheard.py),
the ticker against ticks that answer when told. Time is moved by hand (the records' start), not
slept through."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from bridge.asgi import ClientDisconnected
from bridge.errors import BridgeError, Kind
from bridge.journey import Journey
from bridge.ports import Admission
from bridge.settings import BridgeSettings
from bridge.surfaces.chat import ChatSurface
from service.ledger import _Ticker
from tests.test_admission_unheard import BODY, HandOutLedger, Keys, NoUpstream
from tests.test_ledger_ticker import _reservation

STALLED = "request stalled before its admission"
UNANSWERED = "ledger tick unanswered"


def _logged(caplog, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


def _age(journey: Journey, seconds: float) -> None:
    for arriving in journey._arriving:
        arriving.started -= seconds


class RefusingUpstream:
    name = "test"

    async def open(self, request, request_id, account=None):
        raise BridgeError(Kind.upstream_error, "No upstream here.")


async def _journey_waiting() -> tuple[Journey, HandOutLedger, asyncio.Future, asyncio.Future, asyncio.Event]:
    """A journey with one request waiting for its admission and one reading its body."""
    ledger = HandOutLedger()
    journey = Journey(settings=BridgeSettings(), auth=Keys(), ledger=ledger, upstream=NoUpstream())
    body_sent = asyncio.Event()

    async def body() -> bytes:
        return BODY

    async def slow_body() -> bytes:
        await body_sent.wait()
        return BODY
    admitting = asyncio.ensure_future(journey.handle(ChatSurface(), "key", body))
    reading = asyncio.ensure_future(journey.handle(ChatSurface(), "key", slow_body))
    while not ledger.admissions or len(journey._arriving) < 2:
        await asyncio.sleep(0)
    return journey, ledger, admitting, reading, body_sent


async def test_a_request_stuck_before_its_admission_is_logged_once_with_its_stage(caplog):
    journey, ledger, admitting, reading, body_sent = await _journey_waiting()
    journey.warn_stalled(after=30)  # just arrived: nothing to say
    assert not _logged(caplog, STALLED)
    _age(journey, 31)
    journey.warn_stalled(after=30)
    journey.warn_stalled(after=30)  # once each
    stalled = _logged(caplog, STALLED)
    assert sorted(r.stage for r in stalled) == ["admission", "body"]
    assert all(r.arriving == "admission:1,body:1" and r.surface == "chat" and r.seconds >= 31 for r in stalled)
    # refused, the first is no longer watched; the second, cancelled while reading, neither
    ledger.admissions[0][1].set_result(Admission("inactive", detail="canceled"))
    await asyncio.gather(admitting, return_exceptions=True)
    assert len(journey._arriving) == 1
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    assert not journey._arriving


async def test_an_admitted_request_and_a_client_that_left_are_no_longer_watched():
    ledger = HandOutLedger()
    journey = Journey(settings=BridgeSettings(), auth=Keys(), ledger=ledger, upstream=RefusingUpstream())

    async def body() -> bytes:
        return BODY

    async def gone() -> bytes:
        raise ClientDisconnected()
    with pytest.raises(ClientDisconnected):
        await journey.handle(ChatSurface(), "key", gone)
    assert not journey._arriving
    handling = asyncio.ensure_future(journey.handle(ChatSurface(), "key", body))
    while not ledger.admissions:
        await asyncio.sleep(0)
    ledger.admissions[0][1].set_result(Admission("admitted", room=0))
    assert (await handling).status == 502  # admitted, forwarded, refused upstream
    assert not journey._arriving


async def test_a_tick_left_unanswered_is_logged_once_with_its_context(caplog):
    answer = asyncio.Event()

    async def tick(settles, admits, plan_only):
        await answer.wait()
        return [], [Admission("admitted", room=10**9) for _ in admits]
    ticker = _Ticker(tick, lambda a: None)
    admitted = ticker.admit(_reservation("a", held=10))
    await asyncio.sleep(0)
    ticker.warn_stalled(after=30, pool_idle=0)  # just sent: nothing to say
    assert not _logged(caplog, UNANSWERED)
    ticker._sent_at -= 31
    ticker.warn_stalled(after=30, pool_idle=0)
    ticker.warn_stalled(after=30, pool_idle=0)
    [unanswered] = _logged(caplog, UNANSWERED)
    assert (unanswered.admissions, unanswered.settlements, unanswered.pool_idle) == (1, 0, 0)
    answer.set()
    assert (await admitted).outcome == "admitted"
    ticker.warn_stalled(after=0.0)  # nothing in flight: nothing to say
    assert len(_logged(caplog, UNANSWERED)) == 1


async def test_a_failed_tick_tried_again_is_still_in_flight_then_cleared():
    calls = []
    answer = asyncio.Event()

    async def tick(settles, admits, plan_only):
        calls.append(len(admits))
        if len(calls) == 1:
            raise OSError("the batch fails")
        await answer.wait()
        return [], [Admission("admitted", room=10**9) for _ in admits]
    ticker = _Ticker(tick, lambda a: None)
    admitted = ticker.admit(_reservation("a", held=10))
    while len(calls) < 2:
        await asyncio.sleep(0)
    assert ticker._sent_at is not None  # the batch tried again is the same tick, still in flight
    answer.set()
    assert (await admitted).outcome == "admitted"
    assert ticker._sent_at is None


async def test_a_ticker_loop_that_fails_answers_its_batch_and_carries_on(caplog):
    sent = asyncio.Event()
    answer = asyncio.Event()
    orphans: list[str] = []

    async def tick(settles, admits, plan_only):
        sent.set()
        await answer.wait()
        return [], [Admission("admitted", room=10**9) for _ in admits]

    def orphan(reservation):
        orphans.append(reservation.surface)
        if len(orphans) == 1:
            raise RuntimeError("a bug in the loop")
    ticker = _Ticker(tick, orphan)
    left = ticker.admit(_reservation("left", held=10))
    overdue = ticker.admit(_reservation("overdue", held=10))
    waiting = ticker.admit(_reservation("waiting", held=10))
    await sent.wait()
    left.cancel()  # its admission, once answered, is an orphan, and the orphan's handling raises
    overdue.set_exception(TimeoutError("given up"))  # as `Journey.answer_overdue` does
    answer.set()
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(waiting, 5)  # answered with the error, not left waiting
    assert any(r.getMessage() == "ledger ticker failed; its batch is answered with the error"
               for r in caplog.records)
    # every admission whose caller heard no admission is voided, the given-up one too
    assert {"left", "overdue", "waiting"} <= set(orphans)
    assert (await asyncio.wait_for(ticker.admit(_reservation("next", held=10)), 5)).outcome == "admitted"


async def test_admissions_queued_with_no_tick_running_are_logged_and_carried(caplog):
    async def tick(settles, admits, plan_only):
        return [], [Admission("admitted", room=10**9) for _ in admits]
    ticker = _Ticker(tick, lambda a: None)
    ticker.warn_stalled(after=30)
    assert not caplog.records
    # the state a ticker that died with work queued would leave (nothing known makes it)
    future = asyncio.get_running_loop().create_future()
    ticker._admits.append((_reservation("a", held=10), future, False))
    ticker.warn_stalled(after=30)
    assert _logged(caplog, "admissions queued with no ledger tick running; starting one")
    assert (await asyncio.wait_for(future, 5)).outcome == "admitted"


class _Quiet:
    """A journey and a ledger with nothing stalled."""

    def warn_stalled(self, after: float) -> None:
        pass

    def answer_overdue(self, after: float) -> int:
        return 0


def test_an_event_loop_held_by_one_call_leaves_every_threads_stack_on_stderr(monkeypatch, capfd, caplog):
    import service.app

    monkeypatch.setattr(service.app, "_HELD_DUMP", 1.5)

    async def main() -> None:
        # checks every 0.5 s (a third of the overdue bound); its dump armed 2 s ahead
        watch = asyncio.create_task(service.app._watch_stalls(_Quiet(), _Quiet(), overdue=1.5))
        await asyncio.sleep(0.1)
        time.sleep(6.0)  # the loop held by one call, long past the dump's moment
        await asyncio.sleep(0.1)
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        # cancelled with its watch: a loop held now is nobody's to report
        time.sleep(2.5)
    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    err = capfd.readouterr().err
    assert err.count("Timeout (") == 1 and "most recent call first" in err
    assert "test_stall_watch.py" in err and "in main" in err  # where it was held
    assert _logged(caplog, "event loop held up")
