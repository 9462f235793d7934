"""A client that leaves while its admission is decided (bridge/journey.py `Journey._unheard`).

Still pending, the admission is cancelled and the ledger voids an entry it admits meanwhile
(service/ledger.py, tested in tests/test_money_safe.py). Answered in the very moment the
request is cancelled, the answer is never heard: an entry admitted then must be voided at once,
not left holding its windows and its place under the plan's cap until the sweeper expires it.
A ledger that hands out its futures stands in for the database."""
from __future__ import annotations

import asyncio
import json
import uuid

from bridge.journey import Journey
from bridge.ports import Admission, Principal, Reservation, Settlement
from bridge.settings import BridgeSettings
from bridge.surfaces.chat import ChatSurface

PRINCIPAL = Principal(account_id=1, api_key_id=1, subscription_id=1, plan_id="p", models=("glm-4.6",))
BODY = json.dumps({"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]}).encode()


class Keys:
    async def authenticate(self, key: str) -> Principal | None:
        return PRINCIPAL


class HandOutLedger:
    def __init__(self) -> None:
        self.admissions: list[tuple[Reservation, asyncio.Future]] = []
        self.settled: list[Settlement] = []

    def admit(self, reservation: Reservation) -> "asyncio.Future[Admission]":
        future = asyncio.get_running_loop().create_future()
        self.admissions.append((reservation, future))
        return future

    def settle(self, settlement: Settlement) -> "asyncio.Future[int | None]":
        self.settled.append(settlement)
        written = asyncio.get_running_loop().create_future()
        written.set_result(0)
        return written

    async def heartbeat(self, entry_id, delivered_tokens: int) -> bool:
        return True


class NoUpstream:
    name = "test"

    async def open(self, request, request_id, account=None):
        raise AssertionError("nothing is forwarded before the admission is heard")


async def _waiting(ledger: HandOutLedger) -> tuple[asyncio.Task, Reservation, asyncio.Future]:
    journey = Journey(settings=BridgeSettings(), auth=Keys(), ledger=ledger, upstream=NoUpstream())

    async def body() -> bytes:
        return BODY
    asked = len(ledger.admissions)
    handling = asyncio.ensure_future(journey.handle(ChatSurface(), "key", body))
    while len(ledger.admissions) == asked:
        assert not handling.done(), handling.result()  # answered without asking the ledger
        await asyncio.sleep(0)
    reservation, admitting = ledger.admissions[-1]
    return handling, reservation, admitting


async def test_an_admission_answered_as_the_client_leaves_is_voided_at_once():
    ledger = HandOutLedger()
    handling, reservation, admitting = await _waiting(ledger)
    admitting.set_result(Admission("admitted", room=10**9))  # answered...
    handling.cancel()  # ...and the client gone before the request hears it
    await asyncio.gather(handling, return_exceptions=True)
    assert handling.cancelled()
    assert [(s.entry_id, s.state, s.reason) for s in ledger.settled] == [
        (reservation.entry_id, "voided", "admission abandoned")]


async def test_a_pending_admission_is_cancelled_and_a_refusal_voids_nothing():
    ledger = HandOutLedger()
    handling, _, admitting = await _waiting(ledger)
    handling.cancel()
    await asyncio.gather(handling, return_exceptions=True)
    assert admitting.cancelled() and ledger.settled == []  # the ledger never sends it, or voids it

    handling, _, admitting = await _waiting(ledger)
    admitting.set_result(Admission("window_full", window_kind="5h"))
    handling.cancel()
    await asyncio.gather(handling, return_exceptions=True)
    assert ledger.settled == []  # nothing was admitted


async def test_the_ledgers_own_orphan_void_names_its_subscription():
    # service/ledger.py voids an admission whose caller was cancelled while it was pending; a void
    # of unknown subscription would mark every first try of the next batch plan-only, and could
    # not wait for an admission of its entry still in PostgreSQL (migrations/0043)
    from service.ledger import Ledger
    ledger = Ledger(None, lease_seconds=60)  # type: ignore[arg-type] - no tick is run here
    handed = HandOutLedger()
    ledger.settle = handed.settle  # type: ignore[method-assign]
    reservation = Reservation(entry_id=uuid.uuid4(), subscription_id=7, api_key_id=1,
                              surface="chat", model="glm-4.6", prompt_estimate=1, reserve=2, held=3)
    ledger._void_orphan(reservation)
    # (abandoned: its tick locks that subscription's flight row even before the entry exists)
    assert [(s.entry_id, s.state, s.reason, s.subscription_id, s.abandoned) for s in handed.settled] == [
        (reservation.entry_id, "voided", "admission abandoned", 7, True)]


async def test_an_admission_waiting_past_its_bound_is_answered_503_and_left_to_the_ledger():
    """`Journey.answer_overdue` (called by the process's watch): a request whose admission the
    ledger has not answered in time gets a retryable 503 in its protocol's shape; the ledger's
    future holds `AdmissionOverdue`, so a tick that admits it later finds nobody waiting and
    voids it (service/ledger.py, tests/test_money_safe.py)."""
    from bridge.journey import AdmissionOverdue
    ledger = HandOutLedger()
    journey = Journey(settings=BridgeSettings(), auth=Keys(), ledger=ledger, upstream=NoUpstream())

    async def body() -> bytes:
        return BODY
    handling = asyncio.ensure_future(journey.handle(ChatSurface(), "key", body))
    while not ledger.admissions:
        await asyncio.sleep(0)
    assert journey.answer_overdue(after=30) == 0  # just asked: nothing overdue
    for arriving in journey._arriving:  # its admission began 31 s ago (its arrival is not the clock)
        arriving.admitting_since -= 31
    assert journey.answer_overdue(after=30) == 1
    reply = await asyncio.wait_for(handling, 5)
    assert reply.status == 503 and reply.headers.get("retry-after") == "2"
    assert json.loads(reply.body)["error"]["type"] == "server_error"  # OpenAI's word for a 503
    assert isinstance(ledger.admissions[0][1].exception(), AdmissionOverdue)
    assert journey.answer_overdue(after=30) == 0 and not journey._arriving
    assert ledger.settled == []  # the journey voids nothing: only the ledger knows what it wrote


async def test_an_admission_answered_voided_is_a_retryable_503_not_a_billing_state():
    """'voided' (migrations/0044) answers only a try nobody waits for; should one reach a client
    all the same, it says retry, not "this subscription is inactive, resolve billing"."""
    ledger = HandOutLedger()
    handling, reservation, admitting = await _waiting(ledger)
    admitting.set_result(Admission("voided"))
    reply = await handling
    assert (reply.status, reply.headers.get("retry-after")) == (503, "2"), reply
    assert b"billing" not in reply.body and ledger.settled == []
