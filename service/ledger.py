"""The usage ledger: a two-phase state machine over `usage_ledger` and `quota_windows`.

    pending --post--> posted      the upstream's usage (or, failing that, what we delivered)
            --void--> voided      nothing was served
            --sweep-> expired     the process that held it died; settled at what it can prove

Every transition is one call of a guarded SQL function (rules: migrations/0005; the current
version, with credits, top-ups and overage: migrations/0031, settlement's from 0038 and 0049,
admission's from 0039, 0041, 0042 and 0044, the tick's from 0049) in one transaction, so a
replay or a race between two settlers applies it at most once; each takes its locks in one
order (the subscription's flight row, the entry, the windows by id). Under load, transitions
that arrive while one call is in flight share the next call (migrations/0004).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import logging
import random
import uuid
from typing import Any, Awaitable, Callable

import asyncpg
import msgspec

from bridge.flight import void_abandoned
from bridge.ports import Admission, Counts, Reservation, Settlement

from .db import UNAVAILABLE
from .tick_baton import TickBaton

log = logging.getLogger("codeplan.ledger")


# the bridge's words for what crosses the boundary; `Usage` is kept as the ledger's own name
Usage = Counts

# A deadlock or serialization failure, should one still happen, is retried here and never
# reaches a client (the lock order in migrations/0005 is meant to leave none).
_TRANSIENT = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_TRANSIENT_ATTEMPTS = 5
# A tick that failed with one of these lost its connection or its server, through no element's
# fault. Left out: asyncpg's InterfaceError (its DataError is an argument's fault); a statement
# cancelled (a statement_timeout a batch may exceed where its elements alone would not; a
# pg_cancel_backend); a protocol violation.
_LOST = tuple(kind for kind in UNAVAILABLE if kind is not asyncpg.InterfaceError)


def _lost(error: BaseException) -> bool:
    return isinstance(error, _LOST) and not isinstance(
        error, (asyncpg.QueryCanceledError, asyncpg.ProtocolViolationError))


async def _retrying(call: Callable[[], Awaitable[Any]]) -> Any:
    for attempt in range(1, _TRANSIENT_ATTEMPTS + 1):
        try:
            return await call()
        except _TRANSIENT as exc:
            if attempt == _TRANSIENT_ATTEMPTS:
                raise
            log.warning("ledger transaction retried", extra={"error": type(exc).__name__, "attempt": attempt})
            await asyncio.sleep(random.uniform(0.001, 0.01) * attempt)
    raise AssertionError("unreachable")


# upstream_cost is numeric(18,9): below a billion dollars
_USD_LIMIT = decimal.Decimal(10) ** 9


def _usd(cost: float | None) -> decimal.Decimal | None:
    """A cost for a numeric column, to the nano-dollar; None (unknown) for one the column cannot
    hold: the cost travels in the settlement's batch, so a value PostgreSQL refuses would fail
    the settlement, retried for ever (the entry pending, never billed). Prices are bounded
    (bridge/upstreams.py MAX_PRICE); this is the last guard."""
    if cost is None:
        return None
    usd = decimal.Decimal(f"{cost:.9f}")
    if not usd.is_finite() or abs(usd) >= _USD_LIMIT:
        log.warning("upstream cost out of range; recorded as unknown", extra={"cost": str(cost)[:40]})
        return None
    return usd


def _log_unbilled(settles: list[Settlement], unbilled: dict[int, int]) -> None:
    """Settlements the upstream reported above their hold, billed at the hold (migrations/0049):
    no allowance is passed, so the excess is the operator's to take up with the upstream. Its
    counts are on the row, exactly."""
    for i, credits in unbilled.items():
        s = settles[i - 1]
        log.warning("usage reported above the hold was not billed", extra={
            "entry": str(s.entry_id), "unbilled_credits": credits, "upstream": s.upstream,
            "upstream_request_id": s.upstream_request_id, "prompt_tokens": s.counts.prompt_tokens,
            "completion_tokens": s.counts.completion_tokens})


def _settle_arguments(settles: list[Settlement]) -> tuple[list, ...]:
    """ledger_settle_batch's (and ledger_tick's first) eleven arrays, one element per settlement."""
    return ([s.entry_id for s in settles], [s.state for s in settles],
            [s.counts.prompt_tokens for s in settles], [s.counts.completion_tokens for s in settles],
            [s.counts.cached_tokens for s in settles], [s.counts.reasoning_tokens for s in settles],
            [s.estimated for s in settles], [s.reason for s in settles],
            [s.upstream_request_id for s in settles], [s.upstream for s in settles],
            [_usd(s.upstream_cost) for s in settles])


def _admit_arguments(admits: list[Reservation]) -> tuple[list, ...]:
    """ledger_admit_batch's (and ledger_tick's next) eight arrays, one element per admission."""
    return ([a.entry_id for a in admits], [a.subscription_id for a in admits],
            [a.api_key_id for a in admits], [a.surface for a in admits], [a.model for a in admits],
            [a.prompt_estimate for a in admits], [a.reserve for a in admits], [a.held for a in admits])


def _admission(row: asyncpg.Record) -> Admission:
    return Admission(outcome=row["outcome"], window_kind=row["window_kind"],
                     resets_at=row["resets_at"], allowance=row["allowance"], detail=row["detail"],
                     room=row["room"])


class _Ticker:
    """Every ledger transition of this process, in as few commits as the database allows.

    With synchronous_commit on (no money on an unsynced commit), what a transition costs is its
    commit's WAL flush and its statements' start-up, so the admissions and settlements waiting
    at any moment go to the database together, in one transaction, one commit: one
    `ledger_tick` call, settlements first, then admissions (migrations/0032, 0043), or, when
    only one kind waits, its batch function alone (`Ledger._tick`; settlements only with an
    abandoned admission's void among them still go through `ledger_tick`, which locks that
    subscription's flight row even before its entry exists). An admission starts a tick at
    once when none is running (a client waits for it). A settlement, which nobody waits for (its
    response went out before it), waits `linger` and then goes in the next tick, with whatever
    else waits then; under load those ticks carry many settlements at once.

    So an admission does not wait for the settlement of the request before it, which at one
    request at a time was most of what it waited for (bench/PROFILE.md). Where that settlement
    would have changed the answer (a window full, a plan's concurrency cap reached, while
    settlements of its subscription were still waiting), the admission is tried once more with
    them settled first; and while they wait, a first try may not put any of a request on a top-up
    or overage window (refused as full instead, then tried again: migrations/0041; a later first
    try of the same subscription in the batch waits behind such a refusal: 0042). So an answer
    is the one a settle-first tick would give, as far as a tick's batch reaches (more than
    `max_size` settlements waiting: the rest wait for the next, as they always did). A tick that
    fails is retried element by element, so a fault stays with the element that caused it; one
    that lost its connection is retried once whole, then answered with the error (`_after`).

    In a worker of `codeplan run --workers N`, each tick holds the run's tick baton while it is
    in flight and its batch is cut once the baton is had (service/tick_baton.py), so the workers'
    ticks take turns and carry what one process's would.
    """

    def __init__(self, tick: Callable[[list, list, list], Awaitable[tuple[list, list]]],
                 orphan: Callable[[Reservation], None], *, linger: float = 0.01,
                 max_size: int = 128, baton: TickBaton | None = None) -> None:
        self._tick = tick
        self._baton = baton  # one of several workers: their ticks take turns (service/tick_baton.py)
        # an admission that may be written but nobody will act on: its caller went away, or the
        # database's answer was lost (`Ledger._void_orphan` voids it)
        self._orphan = orphan
        self._linger = linger
        self._max = max_size
        self._settles: list[tuple[Settlement, asyncio.Future]] = []
        # (the reservation, its caller's future, whether it was tried already)
        self._admits: list[tuple[Reservation, asyncio.Future, bool]] = []
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._settles_due = False  # the waiting settlements go in the next tick
        # the tick in flight: when it was sent (`warn_stalled`), and the batch cut last, whose
        # callers get the error should the loop itself fail
        self._sent_at: float | None = None
        self._warned_at: float | None = None
        self._batch: tuple[list, list] = ([], [])  # (settlements, admissions) with their futures

    def admit(self, reservation: Reservation) -> "asyncio.Future[Admission]":
        future = asyncio.get_running_loop().create_future()
        self._admits.append((reservation, future, False))
        self._start()
        return future

    def settle(self, settlement: Settlement) -> "asyncio.Future[int | None]":
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._settles.append((settlement, future))
        if self._timer is None and not self._settles_due:
            self._timer = loop.call_later(self._linger, self._lingered)
        return future

    def _lingered(self) -> None:
        self._timer = None
        self._settles_due = True
        self._start()

    def _start(self) -> None:
        if not self._busy:
            self._busy = True
            asyncio.get_running_loop().create_task(self._run()).add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task) -> None:
        """The loop ended. Raising (nothing known makes it) must not leave the batch it had cut
        unanswered, its callers waiting for ever: they get the error, it is logged, and whatever
        is queued gets a new loop."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("ledger ticker failed; its batch is answered with the error", exc_info=error)
        settles, admits = self._batch  # cut, and its answers not all handed out
        for _, future in settles:
            if not future.done():
                future.set_exception(error)
        for reservation, future, _ in admits:
            # sent or not, its entry may be written: voided unless its caller heard an admission
            if future.done() and not future.cancelled() and future.exception() is None:
                continue
            if not future.done():
                future.set_exception(error)
            try:
                self._orphan(reservation)
            except Exception:  # noqa: BLE001 - the rest of the batch is still answered
                log.exception("abandoned admission not voided; the sweeper will expire it")
        self._batch = ([], [])
        if self._admits:  # (waiting settlements have their linger's timer, set as the loop ended)
            self._start()

    async def _run(self) -> None:
        try:
            while self._admits or (self._settles and self._settles_due):
                # the batch is cut once the baton is had: what arrives while another worker's
                # tick is in flight goes in this one
                held = self._baton is not None and await self._take_baton()
                # an admission whose caller went away (or gave up: `Journey.answer_overdue`)
                # before it was sent is dropped: nothing was written, nobody waits
                if any(future.done() for _, future, _ in self._admits):
                    self._admits = [a for a in self._admits if not a[1].done()]
                admits = self._admits[:self._max]
                del self._admits[:self._max]
                settles: list[tuple[Settlement, asyncio.Future]] = []
                if self._settles_due:
                    settles = self._settles[:self._max]
                    del self._settles[:self._max]
                    self._settles_due = bool(self._settles)
                if not admits and not settles:  # every admission queued was given up
                    if held:
                        self._baton.give()  # type: ignore[union-attr]
                    continue
                # A first try is marked while settlements of its subscription are left waiting
                # (None: one of unknown subscription waits, so any may be one of them): marked,
                # it may not draw on a top-up or overage window (migrations/0041), and a refusal
                # those settlements could lift is tried again after them.
                waiting = {s.subscription_id for s, _ in self._settles}
                marked = [not tried and (None in waiting or a.subscription_id in waiting)
                          for a, _, tried in admits]
                self._batch = (settles, admits)
                self._sent_at = asyncio.get_running_loop().time()
                try:
                    billed, admissions = await self._tick([s for s, _ in settles], [a for a, _, _ in admits],
                                                          marked)
                except Exception as failure:  # noqa: BLE001 - answered below, each element with its own
                    billed, admissions = await self._after(failure, settles, admits, marked)
                finally:
                    self._sent_at = None
                    if held:
                        self._baton.give()  # type: ignore[union-attr]
                for (_, future), result in zip(settles, billed):
                    _deliver(future, result)
                again: list[tuple[Reservation, asyncio.Future, bool]] = []
                for (reservation, future, _), result, mark in zip(admits, admissions, marked):
                    if not isinstance(result, Admission):
                        # the database's answer is lost: the entry may be written, and its
                        # caller (told the error) will forward nothing on it
                        _deliver(future, result)
                        self._orphan(reservation)
                    elif future.done():  # the caller went away meanwhile
                        if result.admitted:
                            self._orphan(reservation)
                    elif mark and result.outcome in _SETTLEMENT_MAY_CHANGE:
                        again.append((reservation, future, True))
                    else:
                        _deliver(future, result)
                self._batch = ([], [])  # answered: nothing left for `_ran`
                if again:  # first in the next tick, the waiting settlements with them
                    self._admits[:0] = again
                    self._settles_due = True
        finally:
            self._busy = False
            # A linger that ended during the last tick, whose settlements that tick took, must
            # not outlive it: the next settlement would wait for a tick nobody starts.
            self._settles_due = False
            if self._settles and self._timer is None:  # left by a failure: they linger again
                self._timer = asyncio.get_running_loop().call_later(self._linger, self._lingered)

    def warn_stalled(self, after: float, **context: Any) -> None:
        """Log a tick unanswered for `after` seconds (once per tick, with `context`), and
        admissions queued with no tick running to carry them, which should never be (the tick is
        started again)."""
        now = asyncio.get_running_loop().time()
        sent_at = self._sent_at
        if sent_at is not None and now - sent_at >= after and self._warned_at != sent_at:
            self._warned_at = sent_at
            log.warning("ledger tick unanswered", extra={
                "seconds": round(now - sent_at, 1), "settlements": len(self._batch[0]),
                "admissions": len(self._batch[1]), "queued_admissions": len(self._admits),
                "queued_settlements": len(self._settles), **context})
        if not self._busy and self._admits:
            log.error("admissions queued with no ledger tick running; starting one",
                      extra={"queued_admissions": len(self._admits)})
            self._start()

    async def _take_baton(self) -> bool:
        try:
            return await self._baton.take()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - an optimisation failing: this tick goes without it
            log.exception("tick baton failed; this tick goes without it")
            return False

    async def _after(self, failure: Exception, settles: list, admits: list, marked: list
                     ) -> tuple[list, list]:
        """The answers to a batch whose tick failed. A fault of the data is kept with the element
        that caused it: each is tried alone. A lost connection is nobody's fault: the batch is
        tried once more as a whole (on another connection: the pool drops the failed one), and
        if that fails too, every element gets the error (settlements are retried by their
        writers, admissions answered 503 and voided), rather than one attempt each, which
        against a database that does not answer costs each a connection's timeout while the
        batch holds the ticker. A gone caller's admission is not tried again (it is voided)."""
        waited = [i for i, (_, future, _) in enumerate(admits) if not future.done()]
        if _lost(failure) and (settles or waited):
            try:
                billed, answers = await self._tick([s for s, _ in settles], [admits[i][0] for i in waited],
                                                   [marked[i] for i in waited])
            except Exception as again:  # noqa: BLE001 - handed to the callers
                if _lost(again):
                    return [again] * len(settles), [again] * len(admits)
                failure = again  # answered, then a fault of the data: each alone, below
            else:
                answered: list = [failure] * len(admits)
                for i, answer in zip(waited, answers):
                    answered[i] = answer
                return billed, answered
        billed = [await self._alone([s], [], []) for s, _ in settles]
        admissions = [failure if future.done() else await self._alone([], [a], [mark])
                      for (a, future, _), mark in zip(admits, marked)]
        return billed, admissions

    async def _alone(self, settles: list, admits: list, plan_only: list) -> Any:
        try:
            billed, admissions = await self._tick(settles, admits, plan_only)
            return billed[0] if settles else admissions[0]
        except Exception as exc:  # noqa: BLE001 - handed to its caller
            return exc


# refusals that a settlement still waiting could turn into an admission: it gives back its hold
# on the windows and its place under the plan's concurrency cap (a plan-only try that the plan
# could not hold is refused as window_full too)
_SETTLEMENT_MAY_CHANGE = frozenset({"window_full", "concurrency"})


def _deliver(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class ExpiredEntry(msgspec.Struct, frozen=True):
    """An entry the sweeper expired: what it recorded (no cached tokens: none are proven)."""
    model: str
    prompt_tokens: int
    completion_tokens: int
    billed: int


class Ledger:
    """The bridge's `LedgerPort`, over the SQL functions of migrations/0031, 0032, 0038, 0039, 0041,
    0042, 0043 and 0044."""

    def __init__(self, pool: asyncpg.Pool, *, lease_seconds: float, linger: float = 0.01,
                 baton: TickBaton | None = None) -> None:
        self._pool = pool
        self._lease = lease_seconds
        self._ticker = _Ticker(self._tick, self._void_orphan, linger=linger, baton=baton)

    def admit(self, reservation: Reservation) -> "asyncio.Future[Admission]":
        return self._ticker.admit(reservation)

    def settle(self, settlement: Settlement) -> "asyncio.Future[int | None]":
        """Settle a pending entry, in the next tick. The future holds the billed credits, or None
        if it was settled already (a replay), or a database failure: the caller retries,
        harmlessly."""
        return self._ticker.settle(settlement)

    def warn_stalled(self, after: float) -> None:
        """A tick unanswered for `after` seconds is logged (service/app.py asks every few
        seconds), with the pool's idle connections: none idle, the tick may be waiting for one."""
        self._ticker.warn_stalled(after, pool_idle=self._pool.get_idle_size(), pool_size=self._pool.get_size())

    def _void_orphan(self, a: Reservation) -> None:
        """An admission that may be written and that nobody will forward: voided, retried for a
        whole lease from now (a deadline too late costs only retries that find the entry expired;
        one too early would leave it to the sweeper, who bills its prompt estimate)."""
        void_abandoned(self, a, self._lease)

    async def post(self, entry_id: uuid.UUID, usage: Counts, *, estimated: bool, reason: str,
                   upstream_request_id: str | None = None) -> int | None:
        return await self.settle(Settlement(entry_id, "posted", usage, estimated, reason, upstream_request_id))

    async def void(self, entry_id: uuid.UUID, *, reason: str) -> int | None:
        return await self.settle(Settlement(entry_id, "voided", Counts(), False, reason))

    async def _tick(self, settles: list[Settlement], admits: list[Reservation], plan_only: list[bool]
                    ) -> tuple[list[int | None], list[Admission]]:
        # One transaction either way. A tick of one kind calls its function directly: each locks
        # the subscriptions' existing flight rows first, in id order, as ledger_tick does for both
        # (admission makes a new subscription's row after them: migrations/0042), and
        # ledger_tick's own statements cost ~0.12 ms a call, which at one request at a time is on
        # every admission's path (bench/PROFILE.md).
        billed: dict[int, int] = {}
        unbilled: dict[int, int] = {}  # usage the upstream reported above the hold (rare)
        admissions: dict[int, Admission] = {}
        # An abandoned admission's void locks its subscription's flight row whether or not its
        # entry is there yet: the admission may still be waiting for that row in PostgreSQL, and
        # commit after a void that found nothing (migrations/0043); finding nothing, the void
        # leaves a mark there that such an admission reads (0044). Only ledger_tick takes them.
        waits_for = ([s.subscription_id if s.abandoned else None for s in settles]
                     if any(s.abandoned for s in settles) else None)
        if not admits and waits_for is None:
            for r in await _retrying(lambda: self._pool.fetch(
                    "SELECT * FROM ledger_settle_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    *_settle_arguments(settles))):
                billed[r["i"]] = r["billed"]
                if r["unbilled"]:
                    unbilled[r["i"]] = r["unbilled"]
        elif not settles:
            for r in await _retrying(lambda: self._pool.fetch(
                    "SELECT * FROM ledger_admit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    *_admit_arguments(admits), self._lease, plan_only)):
                admissions[r["i"]] = _admission(r)
        else:
            for r in await _retrying(lambda: self._pool.fetch(
                    "SELECT * FROM ledger_tick($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
                    " $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
                    *_settle_arguments(settles), *_admit_arguments(admits), self._lease, plan_only,
                    waits_for)):
                if r["kind"] == "settle":
                    billed[r["i"]] = r["billed"]
                    if r["unbilled"]:
                        unbilled[r["i"]] = r["unbilled"]
                else:
                    admissions[r["i"]] = _admission(r)
        if unbilled:
            _log_unbilled(settles, unbilled)
        return ([billed.get(i + 1) for i in range(len(settles))],
                [admissions[i + 1] for i in range(len(admits))])

    async def heartbeat(self, entry_id: uuid.UUID, delivered_tokens: int) -> bool:
        """Extend a live request's lease and record the completion tokens it has delivered.
        False when the entry is no longer pending."""
        status = await self._pool.execute(
            "UPDATE usage_ledger SET delivered_tokens = $2,"
            " lease_until = now() + make_interval(secs => $3)"
            " WHERE id = $1 AND state = 'pending'",
            entry_id, delivered_tokens, self._lease)
        return status == "UPDATE 1"

    async def expire_due(self, limit: int = 500) -> int:
        """Expire up to `limit` entries whose lease ran out; how many (`codeplan sweep`)."""
        return len(await self.expire_due_entries(limit))

    async def expire_due_entries(self, limit: int = 500) -> list[ExpiredEntry]:
        """Expire up to `limit` entries whose lease ran out (their process died), each billed at
        its prompt estimate plus the completion tokens it delivered; what each recorded, for the
        sweeper to count in the metrics the bridge's settlements move (service/app.py)."""
        # One statement: the join reads each entry as it was before the function settled it (the
        # statement's snapshot), which is why it takes the estimate and delivered tokens the
        # function passed (migrations/0031) rather than the settled columns; the model never changes.
        rows = await _retrying(lambda: self._pool.fetch(
            "SELECT l.model, l.prompt_estimate AS prompt, l.delivered_tokens AS completion, e.billed"
            "  FROM ledger_expire_due($1) e JOIN usage_ledger l ON l.id = e.id", limit))
        if rows:
            log.warning("expired pending reservations", extra={"count": len(rows)})
        return [ExpiredEntry(r["model"], r["prompt"], r["completion"], r["billed"]) for r in rows]

    async def forget_void_marks(self, older_than: float = 86_400.0) -> int:
        """Delete the marks abandoned admissions' voids left (migrations/0044) once no statement
        of theirs can still be on its way: a day by default."""
        status = await self._pool.execute(
            "DELETE FROM ledger_void_marks WHERE marked_at < now() - make_interval(secs => $1)", older_than)
        return int(status.split()[-1])

    async def rollup(self, before: dt.datetime) -> int:
        """Move settled rows created before the UTC midnight at or before `before` into per-day
        aggregates (whole UTC days only, migrations/0054); totals unchanged."""
        return await self._pool.fetchval("SELECT ledger_rollup($1)", before)
