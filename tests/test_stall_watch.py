"""The stall watch (service/app.py `_watch_stalls`): a request stuck before its admission, and a
ledger tick left unanswered, are logged once each with where they wait, so a hang says where it
is. The journey against a ledger that hands out its futures (tests/test_admission_unheard.py),
the ticker against a tick that answers when told."""
from __future__ import annotations

import asyncio
import logging

from bridge.journey import Journey
from bridge.ports import Admission
from bridge.settings import BridgeSettings
from bridge.surfaces.chat import ChatSurface
from service.ledger import _Ticker
from tests.test_admission_unheard import BODY, HandOutLedger, Keys, NoUpstream
from tests.test_ledger_ticker import _reservation


def _stalls(caplog, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


async def test_a_request_stuck_before_its_admission_is_logged_once_with_its_stage(caplog):
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
    while not ledger.admissions:
        await asyncio.sleep(0)
    journey.warn_stalled(after=0.05)  # not long enough yet
    assert not _stalls(caplog, "request stalled before its admission")
    await asyncio.sleep(0.06)
    journey.warn_stalled(after=0.05)
    journey.warn_stalled(after=0.05)  # once each
    stalled = _stalls(caplog, "request stalled before its admission")
    assert sorted(r.stage for r in stalled) == ["admission", "body"]
    assert all(r.arriving_by_stage == {"admission": 1, "body": 1} and r.surface == "chat" for r in stalled)
    # answered, neither is watched any more
    ledger.admissions[0][1].set_result(Admission("window_full", window_kind="5h", resets_at=None, allowance=1))
    body_sent.set()
    while len(ledger.admissions) < 2:
        await asyncio.sleep(0)
    ledger.admissions[1][1].set_result(Admission("inactive", detail="canceled"))
    await asyncio.gather(admitting, reading, return_exceptions=True)
    assert not journey._arriving


async def test_a_tick_left_unanswered_is_logged_once(caplog):
    answer = asyncio.Event()

    async def tick(settles, admits, plan_only):
        await answer.wait()
        return [], [Admission("admitted", room=10**9) for _ in admits]
    ticker = _Ticker(tick, lambda a, b: None)
    admitted = ticker.admit(_reservation("a", held=10))
    await asyncio.sleep(0.06)
    ticker.warn_stalled(after=0.05)
    ticker.warn_stalled(after=0.05)
    [stalled] = _stalls(caplog, "ledger tick unanswered")
    assert (stalled.admissions, stalled.settlements, stalled.seconds >= 0.05) == (1, 0, True)
    answer.set()
    assert (await admitted).outcome == "admitted"
    ticker.warn_stalled(after=0.0)  # nothing in flight: nothing to say
    assert len(_stalls(caplog, "ledger tick unanswered")) == 1


async def test_admissions_queued_with_no_tick_running_are_logged_and_carried(caplog):
    async def tick(settles, admits, plan_only):
        return [], [Admission("admitted", room=10**9) for _ in admits]
    ticker = _Ticker(tick, lambda a, b: None)
    # the state a ticker that died with work queued would leave (nothing known makes it)
    future = asyncio.get_running_loop().create_future()
    ticker._admits.append((_reservation("a", held=10), future, False))
    ticker.warn_stalled(after=30)
    assert _stalls(caplog, "admissions queued with no ledger tick running; starting one")
    assert (await asyncio.wait_for(future, 5)).outcome == "admitted"
