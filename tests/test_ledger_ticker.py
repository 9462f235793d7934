"""The ledger's ticker (service/ledger.py `_Ticker`) against a model of the database: an admission
does not wait for the settlement before it, and every answer is the one a settle-first tick
would give. The same rules end to end, through the bridge and PostgreSQL, are in
tests/test_ledger_under_load.py and tests/test_money_safe.py."""
from __future__ import annotations

import asyncio
import uuid

import asyncpg

from bridge.ports import Admission, Counts, Reservation, Settlement
from service.ledger import _Ticker

LINGER = 0.05


class Model:
    """One subscription with a concurrency cap and a window, as ledger_tick treats them:
    settlements first, then admissions in order. Records what each tick carried."""

    def __init__(self, cap: int = 1, window: int = 1_000, extra: int = 0) -> None:
        self.cap, self.room, self.extra = cap, window, extra  # extra: a top-up's room
        self.holds: dict[uuid.UUID, int] = {}
        self.ticks: list[tuple[list[str], list[str]]] = []
        self.gate: asyncio.Event | None = None  # when set: each tick waits for it
        self.delay = 0.0  # seconds each tick that carries settlements takes
        self.spilled = 0  # held on the top-up
        self.spilled_by: dict[str, int] = {}  # per request (by its surface, the test's name for it)

    async def tick(self, settles: list[Settlement], admits: list[Reservation], plan_only: list[bool]
                   ) -> tuple[list, list]:
        self.ticks.append(([s.reason for s in settles], [a.surface for a in admits]))
        if self.gate is not None:
            await self.gate.wait()
        if settles:
            await asyncio.sleep(self.delay)
        billed = []
        for s in settles:
            self.room += self.holds.pop(s.entry_id) - s.counts.completion_tokens
            billed.append(s.counts.completion_tokens)
        admissions = []
        marked_refused = False  # migrations/0042: later plan-only requests keep their place behind it
        for a, only in zip(admits, plan_only):
            if only and marked_refused:  # (checked before the cap, as in 0042)
                admissions.append(Admission("window_full", window_kind="5h"))
            elif len(self.holds) >= self.cap:
                admissions.append(Admission("concurrency", allowance=self.cap))
            elif a.held > self.room and (only or a.held - self.room > self.extra):
                marked_refused = marked_refused or only
                admissions.append(Admission("window_full", window_kind="5h"))
            else:  # what the plan cannot hold goes on the top-up
                part = min(a.held, self.room)
                self.holds[a.entry_id] = part
                self.room -= part
                self.extra -= a.held - part
                self.spilled += a.held - part
                if a.held > part:
                    self.spilled_by[a.surface] = a.held - part
                admissions.append(Admission("admitted", room=self.room + self.extra))
        return billed, admissions


def _reservation(name: str, held: int = 100) -> Reservation:
    return Reservation(entry_id=uuid.uuid4(), subscription_id=1, api_key_id=1, surface=name, model="glm-4.6",
                       prompt_estimate=10, reserve=held, held=held)


_ITS_OWN = object()


def _settlement(reservation: Reservation, used: int = 40, subscription=_ITS_OWN) -> Settlement:
    """The bridge names the subscription a settlement releases; a settler that does not know it
    (`Ledger.post`) leaves None."""
    return Settlement(reservation.entry_id, "posted", Counts(completion_tokens=used), False,
                      reservation.surface,
                      subscription_id=reservation.subscription_id if subscription is _ITS_OWN else subscription)


def _ticker(model: Model) -> _Ticker:
    return _Ticker(model.tick, lambda reservation: None, linger=LINGER)  # no caller goes away here


async def _answered(ticker: _Ticker, name: str = "first", subscription=_ITS_OWN) -> asyncio.Future:
    """A request admitted and answered: its settlement is on its way (the future), and the
    client's next request comes at once."""
    reservation = _reservation(name)
    assert (await ticker.admit(reservation)).admitted
    settled = asyncio.ensure_future(ticker.settle(_settlement(reservation, subscription=subscription)))
    await asyncio.sleep(0)
    return settled


async def test_an_admission_does_not_wait_for_the_settlement_before_it():
    model = Model(cap=2)
    ticker = _ticker(model)
    settled = await _answered(ticker)
    assert (await ticker.admit(_reservation("second"))).admitted
    assert model.ticks == [([], ["first"]), ([], ["second"])]  # the settlement waits
    assert await settled == 40  # and goes on its own once it has lingered
    assert model.ticks[2] == (["first"], [])


async def test_a_refusal_a_waiting_settlement_would_lift_is_tried_again_after_it():
    # a client one request at a time on a plan of one request at a time: the request before
    # is answered, its settlement waits, and the next request must not be told "too many"
    model = Model(cap=1)
    ticker = _ticker(model)
    settled = await _answered(ticker)
    second = await ticker.admit(_reservation("second"))
    assert second.admitted, second
    assert model.ticks == [([], ["first"]), ([], ["second"]), (["first"], ["second"])]
    assert await settled == 40


async def test_a_settlement_of_unknown_subscription_counts_as_anyones():
    model = Model(cap=1)
    ticker = _ticker(model)
    settled = await _answered(ticker, subscription=None)
    assert (await ticker.admit(_reservation("second"))).admitted
    assert model.ticks == [([], ["first"]), ([], ["second"]), (["first"], ["second"])]
    await settled


async def test_another_subscriptions_waiting_settlement_changes_nothing_here():
    # (the model keeps one subscription's books: the settlement is labelled another's, so the
    # ticker must not wait for it, and the refusal stands at once)
    model = Model(cap=1)
    ticker = _ticker(model)
    settled = await _answered(ticker, subscription=2)
    assert (await ticker.admit(_reservation("second"))).outcome == "concurrency"
    assert model.ticks == [([], ["first"]), ([], ["second"])]
    await settled


async def test_a_window_the_waiting_settlement_frees_admits_after_it():
    model = Model(cap=10, window=150)  # the first request's hold leaves room for no second one
    ticker = _ticker(model)
    await _answered(ticker)
    assert (await ticker.admit(_reservation("second"))).admitted
    assert model.ticks[-1] == (["first"], ["second"])


async def test_a_request_the_plan_could_hold_after_the_waiting_settlement_draws_nothing_from_a_top_up():
    # a top-up could take the part the previous request's hold still covers; settled first, the
    # plan holds it all, so the first try may not spill and the second, after the settlement, fits
    model = Model(cap=10, window=150, extra=1_000)
    ticker = _ticker(model)
    await _answered(ticker)
    assert (await ticker.admit(_reservation("second"))).admitted
    assert model.ticks[-2:] == [([], ["second"]), (["first"], ["second"])]
    assert model.spilled == 0


async def test_two_first_tries_of_one_subscription_are_tried_again_in_their_order():
    # settled first, the plan holds the larger request whole and the smaller one spills. Both
    # marked in a tick before the settlement, the larger is refused; the smaller must not take
    # the plan's room meanwhile (migrations/0042), or the larger would spill on its retry
    model = Model(cap=10, window=250, extra=1_000)
    ticker = _ticker(model)
    await _answered(ticker)  # holds 100, uses 40: settled, the plan has 210 left
    big, small = _reservation("big", held=200), _reservation("small", held=100)
    answers = await asyncio.gather(ticker.admit(big), ticker.admit(small))  # one batch
    assert all(a.admitted for a in answers)
    assert model.ticks[-2:] == [([], ["big", "small"]), (["first"], ["big", "small"])]
    assert model.spilled_by == {"small": 90}


async def test_a_request_the_plan_cannot_hold_still_spills_at_once_with_nothing_waiting():
    model = Model(cap=10, window=150, extra=1_000)
    ticker = _ticker(model)
    assert (await ticker.admit(_reservation("first"))).admitted
    assert (await ticker.admit(_reservation("second"))).admitted
    assert model.spilled == 50 and len(model.ticks) == 2


async def test_a_refusal_with_nothing_waiting_is_answered_at_once():
    model = Model(cap=1)
    ticker = _ticker(model)
    assert (await ticker.admit(_reservation("first"))).admitted
    refused = await ticker.admit(_reservation("second"))
    assert refused.outcome == "concurrency"
    assert model.ticks == [([], ["first"]), ([], ["second"])]  # no second try: nothing could change


async def test_a_refusal_is_tried_again_once_only():
    model = Model(cap=1)
    ticker = _ticker(model)
    first, second = _reservation("first"), _reservation("second")
    assert (await ticker.admit(first)).admitted
    assert (await ticker.admit(second)).outcome == "concurrency"
    # a settlement waits, but it is for an entry still holding the only place
    model.holds[second.entry_id] = 0  # (the model's own bookkeeping: a second holder)
    settled = asyncio.ensure_future(ticker.settle(_settlement(second, used=0)))
    await asyncio.sleep(0)
    third = await ticker.admit(_reservation("third"))
    assert third.outcome == "concurrency"  # still full after the settlement: refused, once
    assert model.ticks[-2:] == [([], ["third"]), (["second"], ["third"])]
    await settled


async def test_a_linger_that_ends_during_the_tick_that_took_its_settlements_leaves_none_behind():
    # the first settlement's linger ends while the retried admission's tick, which took that
    # settlement, is still running; the next settlement must still be written
    model = Model(cap=1)
    ticker = _ticker(model)
    settled = await _answered(ticker)
    second = _reservation("second")
    model.delay = LINGER * 1.5
    assert (await ticker.admit(second)).admitted
    assert model.ticks[-1] == (["first"], ["second"])
    assert await settled == 40
    model.delay = 0.0
    assert await asyncio.wait_for(ticker.settle(_settlement(second)), LINGER * 20) == 40


async def test_under_load_the_settlements_share_ticks():
    model = Model(cap=1_000, window=10**9)
    model.gate = asyncio.Event()
    ticker = _ticker(model)
    firsts = [_reservation(f"r{i}") for i in range(20)]
    admitted = asyncio.gather(*(ticker.admit(r) for r in firsts))
    await asyncio.sleep(0)
    model.gate.set()
    assert all(a.admitted for a in await admitted)
    billed = await asyncio.gather(*(ticker.settle(_settlement(r)) for r in firsts))
    assert billed == [40] * 20
    assert sum(1 for settles, _ in model.ticks if settles) == 1  # one tick for all twenty


# ---- admissions nobody will act on ----------------------------------------------------------

async def test_an_admission_whose_answer_is_lost_is_handed_over_to_be_voided():
    """The database failed the batch, and again when it was tried once more: whether it committed is unknown
    (a reply lost after COMMIT), and its caller, told the error, forwards nothing. Left pending,
    the sweeper would bill the entry its prompt estimate; it is handed to the orphan path, which
    voids it (a void of an entry never written changes nothing)."""
    orphans: list[Reservation] = []
    calls = []

    async def tick(settles, admits, plan_only):
        calls.append([a.surface for a in admits])
        raise ConnectionResetError("the reply is lost")
    ticker = _Ticker(tick, orphans.append, linger=LINGER)
    lost = _reservation("lost")
    try:
        await asyncio.wait_for(ticker.admit(lost), 5)
        raise AssertionError("answered")
    except ConnectionResetError:
        pass
    assert calls == [["lost"], ["lost"]]  # the batch, then once more
    assert orphans == [lost]


async def test_an_admission_given_up_before_its_batch_is_cut_is_never_sent():
    model = Model(cap=10)
    model.gate = asyncio.Event()
    orphans: list[Reservation] = []
    ticker = _Ticker(model.tick, orphans.append, linger=LINGER)
    first = ticker.admit(_reservation("first"))
    while not model.ticks:  # the first tick is in flight, held at the gate
        await asyncio.sleep(0)
    gone = ticker.admit(_reservation("gone"))
    kept = ticker.admit(_reservation("kept"))
    gone.cancel()  # its client left (or `Journey.answer_overdue` gave up) before it was sent
    model.gate.set()
    assert (await first).admitted and (await kept).admitted
    assert [admits for _, admits in model.ticks] == [["first"], ["kept"]]
    # a queue of only given-up admissions makes no tick at all, and the ticker goes on
    model.gate = asyncio.Event()
    held = ticker.admit(_reservation("held"))
    while len(model.ticks) < 3:
        await asyncio.sleep(0)
    alone = ticker.admit(_reservation("alone"))
    alone.cancel()
    model.gate.set()
    assert (await held).admitted
    await asyncio.sleep(LINGER)
    assert [admits for _, admits in model.ticks] == [["first"], ["kept"], ["held"]]
    assert orphans == []  # nothing sent, nothing to void
    # given up while its tick is in flight: admitted meanwhile, it is handed over to be voided
    model.gate = asyncio.Event()
    late = _reservation("late")
    pending = ticker.admit(late)
    while len(model.ticks) < 4:
        await asyncio.sleep(0)
    pending.cancel()
    model.gate.set()
    assert (await ticker.admit(_reservation("after"))).admitted
    assert orphans == [late]


async def test_a_caller_gone_while_its_batch_failed_is_not_tried_again_but_voided():
    orphans: list[Reservation] = []
    calls = []
    failing = asyncio.Event()

    async def tick(settles, admits, plan_only):
        calls.append([a.surface for a in admits])
        if len(calls) == 1:
            failing.set()
            await asyncio.sleep(0.05)
            raise ConnectionResetError("the reply is lost")
        return [], [Admission("admitted", room=10**9) for _ in admits]
    ticker = _Ticker(tick, orphans.append, linger=LINGER)
    gone, stays = _reservation("gone"), _reservation("stays")
    leaving, staying = ticker.admit(gone), ticker.admit(stays)
    await failing.wait()
    leaving.cancel()
    assert (await asyncio.wait_for(staying, 5)).admitted
    assert calls == [["gone", "stays"], ["stays"]]  # the batch, then only the one still waited for
    assert orphans == [gone]


async def test_a_caller_gone_whose_admission_was_refused_leaves_nothing_to_void():
    model = Model(cap=0)  # every admission refused
    model.gate = asyncio.Event()
    orphans: list[Reservation] = []
    ticker = _Ticker(model.tick, orphans.append, linger=LINGER)
    leaving = ticker.admit(_reservation("gone"))
    while not model.ticks:
        await asyncio.sleep(0)
    leaving.cancel()
    model.gate.set()
    assert (await ticker.admit(_reservation("next"))).outcome == "concurrency"
    assert orphans == []



# ---- a batch that fails ---------------------------------------------------------------------

async def _queued_behind_a_gate(tick, names: list[str]) -> tuple[_Ticker, list[asyncio.Future], list]:
    """`names` queued while a first admission's tick waits at a gate: they go in one batch."""
    gate, calls = asyncio.Event(), []

    async def gated(settles, admits, plan_only):
        calls.append([a.surface for a in admits])
        if len(calls) == 1:
            await gate.wait()
            return [], [Admission("admitted", room=10**9)]
        return await tick(settles, admits, plan_only)
    ticker = _Ticker(gated, lambda reservation: None, linger=LINGER)
    first = ticker.admit(_reservation("first"))
    while not calls:
        await asyncio.sleep(0)
    futures = [ticker.admit(_reservation(name)) for name in names]
    gate.set()
    assert (await first).admitted
    return ticker, futures, calls


async def test_a_lost_connection_costs_a_batch_two_tries_not_one_per_element():
    """Against a database that does not answer each try costs a connection's timeout while the
    batch holds the ticker: the batch is tried once more whole, then every element has the error."""
    async def lost(settles, admits, plan_only):
        raise ConnectionResetError("no route to the database")
    _, futures, calls = await _queued_behind_a_gate(lost, ["a", "b", "c"])
    answers = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(a, ConnectionResetError) for a in answers)
    assert calls == [["first"], ["a", "b", "c"], ["a", "b", "c"]]


async def test_a_connection_lost_once_is_answered_by_the_batchs_second_try():
    tries = []

    async def once(settles, admits, plan_only):
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionResetError("the pool's connection had died")
        return [], [Admission("admitted", room=10**9) for _ in admits]
    _, futures, calls = await _queued_behind_a_gate(once, ["a", "b"])
    assert all(a.admitted for a in await asyncio.gather(*futures))
    assert calls == [["first"], ["a", "b"], ["a", "b"]]


async def test_a_fault_of_the_data_stays_with_its_element():
    """An error that is not the connection's (here asyncpg's own for an argument it cannot
    encode) fails the batch; each element is then tried alone, and only its cause gets it."""
    async def poisoned(settles, admits, plan_only):
        if any(a.surface == "bad" for a in admits):
            raise asyncpg.exceptions._base.DataError("invalid input for query argument $6")
        return [], [Admission("admitted", room=10**9) for _ in admits]
    _, futures, calls = await _queued_behind_a_gate(poisoned, ["a", "bad", "c"])
    a, bad, c = await asyncio.gather(*futures, return_exceptions=True)
    assert a.admitted and c.admitted and isinstance(bad, asyncpg.exceptions._base.DataError)
    assert calls == [["first"], ["a", "bad", "c"], ["a"], ["bad"], ["c"]]


async def test_a_caller_gone_during_the_second_try_is_voided_and_settlements_get_its_answers():
    orphans: list[Reservation] = []
    tries, gate, second = [], asyncio.Event(), asyncio.Event()

    async def lost_once(settles, admits, plan_only):
        tries.append(([s.reason for s in settles], [a.surface for a in admits]))
        if len(tries) == 1:  # the first admission's tick, held while the batch gathers behind it
            await gate.wait()
            return [], [Admission("admitted", room=10**9)]
        if len(tries) == 2:
            raise ConnectionResetError("the pool's connection had died")
        second.set()
        await asyncio.sleep(0.05)
        return [40 for _ in settles], [Admission("admitted", room=10**9) for _ in admits]
    ticker = _Ticker(lost_once, orphans.append, linger=LINGER)
    first = ticker.admit(_reservation("first"))
    while not tries:
        await asyncio.sleep(0)
    settled = ticker.settle(_settlement(_reservation("done")))
    await asyncio.sleep(LINGER * 2)  # its linger ends: it goes in the next tick
    gone, stays = _reservation("gone"), _reservation("stays")
    leaving, staying = ticker.admit(gone), ticker.admit(stays)
    gate.set()
    await second.wait()
    leaving.cancel()  # during the second try: it is admitted for nobody
    assert (await first).admitted and (await staying).admitted and await settled == 40
    assert tries[1:] == [(["done"], ["gone", "stays"])] * 2
    assert orphans == [gone]


async def test_a_settlement_in_a_batch_lost_twice_gets_the_error_for_its_writer_to_retry():
    async def lost(settles, admits, plan_only):
        raise ConnectionResetError("no route to the database")
    ticker = _Ticker(lost, lambda reservation: None, linger=LINGER)
    settled = ticker.settle(_settlement(_reservation("done")))
    try:
        await asyncio.wait_for(settled, 5)
        raise AssertionError("answered")
    except ConnectionResetError:
        pass


async def test_a_cancelled_statement_or_a_data_fault_on_the_second_try_goes_element_by_element():
    """A statement_timeout a whole batch exceeds may not be exceeded by its elements alone."""
    for error in (asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
                  asyncpg.exceptions._base.DataError("invalid input for query argument $6")):
        tries = []

        async def failing(settles, admits, plan_only, error=error):
            tries.append(1)
            if len(tries) == 1 and not isinstance(error, asyncpg.QueryCanceledError):
                raise ConnectionResetError("lost")  # the first try lost, the second the data's
            if len(admits) > 1:
                raise error
            return [], [Admission("admitted", room=10**9) for _ in admits]
        _, futures, calls = await _queued_behind_a_gate(failing, ["a", "b"])
        assert all(a.admitted for a in await asyncio.gather(*futures))
        expected = ([["first"], ["a", "b"], ["a"], ["b"]] if isinstance(error, asyncpg.QueryCanceledError)
                    else [["first"], ["a", "b"], ["a", "b"], ["a"], ["b"]])
        assert calls == expected, (error, calls)
