"""One owner per admitted request: a `Flight`, from admission to settlement.

A flight owns the ledger entry, the upstream request on its way (`attach`) and then its response
(and with it the upstream key's slot), the lease keeper, the lifetime cap and the stream meter.
Every exit of the journey ends in `Flight.end` (or, when the client leaves, `Flight.client_gone`,
which may drain first and then ends); `end` acts once: it stops the keeper and the cap, cancels
the upstream request if it has not answered yet, gives the response and its slot back, decides
the settlement from what is known, and hands it to `Flights`, which writes it to the ledger,
retrying with backoff until it is written or the lease passes to the sweeper. A journey that
finds its flight ended under its feet (the cap, the server's shutdown) reads `cause` to tell the
client why.

The settlement rules (README, "The ledger"):
- the upstream reported usage: posted at its numbers, whatever else happened;
- the upstream never accepted the request (no 200): voided;
- accepted, no usage: posted at the prompt estimate plus the completion tokens delivered,
  marked estimated (a client that leaves before the first token still pays the prompt: the
  upstream did that work).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from typing import Callable, Coroutine

import aiohttp
import msgspec

from . import sse, wire
from .metering import StreamMeter
from .metrics import BridgeMetrics, NoMetrics
from .ports import Counts, LedgerPort, Principal, Reservation, Settlement
from .settings import BridgeSettings
from .upstream import UpstreamResponse

log = logging.getLogger("codeplan.flight")
access = logging.getLogger("codeplan.access")

_SETTLE_FIRST_DELAY, _SETTLE_MAX_DELAY = 0.05, 5.0
# a settlement still unwritten this close to the lease's end is left to the sweeper
_LEASE_MARGIN = 2.0
# the cause a flight ends with at its lifetime cap (CODEPLAN_MAX_REQUEST_SECONDS)
LIFETIME_CAP = "lifetime cap reached"


# ---- the upstream's chunks ------------------------------------------------------------------

# a JSON string's escapes, each taken whole from its backslash: `\\` is one, so a `u` after it is
# text and a surrogate's escape is found only where it is one (JSON has no backslash outside strings)
_ESCAPE = re.compile(rb"\\(?:u([0-9A-Fa-f]{4})|.)", re.DOTALL)
# the key whose value a string is: the bytes before its opening quote
_KEY = re.compile(rb'"([^"\\]{1,64})"\s*:\s*\Z')
_ESCAPED_REPLACEMENT = rb"\ufffd"  # U+FFFD as a JSON escape: as long as a surrogate's escape
# an event that cannot be read: in the shape of an OpenAI-style server's mid-stream failure, so the
# normaliser ends the answer as broken (glm.StreamNormalizer) and the client is never told it whole
_UNREADABLE = wire.Chunk(error=wire.ChunkError(
    message="The model provider sent an event the bridge could not read.", type="unreadable_chunk",
    code="unreadable_chunk"))


def _halves(raw: bytes) -> list[tuple[int, bool]]:
    """Where `raw` has a UTF-16 surrogate's escape that is not half of a pair: its offset, and
    whether it is a high half (D800-DBFF, a pair's first) or a low one."""
    halves: list[tuple[int, bool]] = []
    high = -1  # a high half's offset, while its low half may come next
    for found in _ESCAPE.finditer(raw):
        digits = found.group(1)
        unit = int(digits, 16) if digits is not None else 0
        at = found.start()
        if high >= 0:
            if 0xDC00 <= unit <= 0xDFFF and at == high + 6:
                high = -1  # a pair
                continue
            halves.append((high, True))
            high = -1
        if 0xD800 <= unit <= 0xDBFF:
            high = at
        elif 0xDC00 <= unit <= 0xDFFF:
            halves.append((at, False))
    if high >= 0:
        halves.append((high, True))
    return halves


def _escaped(raw: bytes, at: int) -> bool:
    """Whether the byte at `at` (a quote) follows an odd run of backslashes: text, not an edge."""
    run = 0
    while at > run and raw[at - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


def _key(raw: bytes, quote: int) -> bytes | None:
    """The key of the string whose opening quote is at `quote`, if it is an object's value."""
    found = _KEY.search(raw, max(0, quote - 80), quote)
    return found.group(1) if found else None


def _opening(raw: bytes, at: int) -> int:
    """The opening quote of the string holding the offset `at`."""
    quote = raw.rfind(b'"', 0, at)
    while quote > 0 and _escaped(raw, quote):
        quote = raw.rfind(b'"', 0, quote)
    return quote


def _decoded(raw: bytes, halves: list[tuple[int, bool]], drop: int = -1) -> wire.Chunk:
    """The chunk `raw` with its lone halves read as U+FFFD (as a UTF-16 decoder reads them) and
    the escape at `drop` taken out; `_UNREADABLE` if it still cannot be read."""
    if halves or drop >= 0:
        mended = bytearray(raw)
        for at, _ in halves:
            mended[at:at + 6] = _ESCAPED_REPLACEMENT  # as long: the offsets hold
        if drop >= 0:
            del mended[drop:drop + 6]
        raw = bytes(mended)
    try:
        return wire.chunk_decoder.decode(raw)
    except msgspec.DecodeError:
        log.warning("upstream chunk unreadable; the answer ends as broken", extra={"bytes": len(raw)})
        return _UNREADABLE


class _Held:
    """A chunk whose string ends with a high half: held until the next event says whether that
    event's first string begins with the low half, under the same key."""

    __slots__ = ("raw", "halves", "key")

    def __init__(self, raw: bytes, halves: list[tuple[int, bool]]) -> None:
        self.raw = raw
        self.halves = halves
        self.key = _key(raw, _opening(raw, halves[-1][0]))

    def pairs_with(self, raw: bytes, first: tuple[int, bool]) -> bool:
        """Whether `first`, the next chunk's first lone half, is the low half beginning a string
        of the same key."""
        at, high = first
        return (not high and self.key is not None and raw[at - 1:at] == b'"' and not _escaped(raw, at - 1)
                and _key(raw, at - 1) == self.key)


def chunks(decoder: sse.SSEDecoder, data: bytes, on_done: Callable[[], None] | None = None) -> list[wire.Chunk]:
    """The upstream chunks completed by `data`, sans I/O; the `[DONE]` sentinel calls `on_done`.

    A chunk msgspec refuses is looked at again (then only: an ordinary chunk costs its one decode
    and one test of an attribute) for a fault an honest upstream's gateway makes: a UTF-16
    surrogate's escape alone. One that cuts an emoji's escaped pair (`\\ud83d\\ude00`) between
    two chunks ends a string of one with the high half and begins the same key's string in the
    next with the low half: the text was valid, only cut, so that chunk is held (on `decoder`,
    the stream's own) until the next event, and the halves are joined when it begins so. A half
    alone for good reads as U+FFFD. A chunk that still cannot be read ends the answer as broken
    (`_UNREADABLE`): skipped, it left a hole in an answer told whole, and billed in full."""
    out: list[wire.Chunk] = []
    for event in decoder.feed(data):
        if event.data == b"[DONE]":
            if decoder.held is not None:
                out.append(_release(decoder))
            if on_done is not None:
                on_done()
            continue
        try:
            chunk = wire.chunk_decoder.decode(event.data)
        except msgspec.DecodeError:
            _mend(decoder, event.data, out)
            continue
        if decoder.held is not None:
            out.append(_release(decoder))
        out.append(chunk)
    return out


def last_chunks(decoder: sse.SSEDecoder) -> list[wire.Chunk]:
    """The stream ended: a chunk `chunks` held for an event that never came, its half read as
    U+FFFD."""
    return [_release(decoder)] if decoder.held is not None else []


def _release(decoder: sse.SSEDecoder) -> wire.Chunk:
    """The held chunk, its high half alone for good (the next event did not begin with the low)."""
    held: _Held = decoder.held  # type: ignore[assignment]
    decoder.held = None
    log.warning("upstream chunk had a lone surrogate escape; read as U+FFFD")
    return _decoded(held.raw, held.halves)


def _mend(decoder: sse.SSEDecoder, raw: bytes, out: list[wire.Chunk]) -> None:
    """`raw`, an event msgspec refused, read after all if a surrogate's half alone is why."""
    halves = _halves(raw)
    held: _Held | None = decoder.held  # type: ignore[assignment]
    if held is not None:
        if halves and held.pairs_with(raw, halves[0]):
            # the pair, cut in two: its high half leaves the held chunk for this one
            decoder.held = None
            high = held.halves[-1][0]
            out.append(_decoded(held.raw, held.halves[:-1], drop=high))
            at = halves[0][0]
            raw = raw[:at] + held.raw[high:high + 6] + raw[at:]
            halves = [(offset + 6, is_high) for offset, is_high in halves[1:]]
            log.info("upstream cut a surrogate pair between two chunks; joined")
        else:
            out.append(_release(decoder))
    if halves and halves[-1][1] and raw[halves[-1][0] + 6:halves[-1][0] + 7] == b'"':
        decoder.held = _Held(raw, halves)  # its string ends with a high half: the next event tells
        return
    if halves:
        log.warning("upstream chunk had a lone surrogate escape; read as U+FFFD")
    out.append(_decoded(raw, halves))


class Taken:
    """A stream request's response while the router still waits for its first event, told by
    the router (bridge/upstreams.py `stream_taken`): the upstream took the request and works on it,
    so a flight that ends now pays the prompt, as one whose client left before the first token
    always did. None before, and again once that attempt failed at its first event."""

    __slots__ = ("response",)

    def __init__(self) -> None:
        self.response: UpstreamResponse | None = None

    def __call__(self, response: UpstreamResponse | None) -> None:
        self.response = response


class Flight:
    __slots__ = ("entry", "entry_text", "entry_hex", "principal", "surface", "model", "shown_model",
                 "prompt_estimate",
                 "raw_prompt", "kind", "meter", "decoder", "opening", "taken", "response", "status",
                 "cause",
                 "started", "forwarded", "opened", "first_token", "upstream_done", "ended_at",
                 "told_overhead_ms", "lease_deadline", "_flights", "_ended", "_draining", "_keeper", "_cap", "_born")

    def __init__(self, flights: "Flights", *, entry: uuid.UUID, principal: Principal, surface: str,
                 model: str, shown_model: str, prompt_estimate: int, raw_prompt: int, kind: str,
                 started: float, entry_text: str | None = None) -> None:
        self._flights = flights
        self.entry = entry
        # its text forms, made once: the upstream's request id, headers, logs, ids in the answer
        self.entry_text = entry_text or str(entry)
        self.entry_hex = self.entry_text.replace("-", "")
        self.principal = principal
        self.surface = surface
        self.model = model
        self.shown_model = shown_model
        self.prompt_estimate = prompt_estimate
        self.raw_prompt = raw_prompt  # uncorrected, for calibration
        self.kind = kind
        self.meter = StreamMeter()
        self.decoder = sse.SSEDecoder()
        # the upstream request until it answers (`attach`); then its response
        self.opening: asyncio.Future[UpstreamResponse] | None = None
        self.taken: Taken | None = None  # (a stream's, `attach`)
        self.response: UpstreamResponse | None = None
        self.status = 200  # what the client was told
        self.started = started
        self.forwarded: float | None = None
        # the upstream's answer arrived (`UpstreamResponse.arrived`: its status; a stream's first event)
        self.opened: float | None = None
        self.first_token: float | None = None  # the first answer bytes went to the client
        self.upstream_done: float | None = None
        self.ended_at: float | None = None
        self.cause: str | None = None  # what ended it (`end`), e.g. LIFETIME_CAP
        # the bridge's own time as the reply's header said it (`Journey.handle`): the access
        # line and the histogram say the same, for a stream too, whose upstream time runs to its end
        self.told_overhead_ms: float | None = None
        self.lease_deadline = time.monotonic() + flights.settings.reservation_lease
        self._ended = False
        self._draining = False
        loop = asyncio.get_running_loop()
        # timers, not tasks: most requests end long before either fires. The cap's timer is set
        # at the first beat (for the same moment), so a request shorter than a beat sets one
        # timer, not two; unless the cap comes first.
        settings = flights.settings
        self._born = loop.time()
        self._keeper: asyncio.TimerHandle | None = loop.call_at(
            self._born + settings.heartbeat_interval, self._beat)
        self._cap: asyncio.TimerHandle | None = loop.call_at(
            self._born + settings.max_request_seconds, self._overdue) \
            if settings.max_request_seconds <= settings.heartbeat_interval else None
        flights.live.add(self)

    # ---- what happened ---------------------------------------------------------------------

    def attach(self, opening: "asyncio.Future[UpstreamResponse]", taken: Taken | None = None) -> None:
        """The upstream request on its way is the flight's: its response, whenever it arrives,
        is accepted (or closed at once, should the flight have ended: never leaked with its key's
        slot), and the flight's end cancels it while it has not answered (the upstream stops
        working for an entry that is settled already). `taken`: what the router tells of a
        stream taken before it is accepted (`Taken`)."""
        self.opening = opening
        self.taken = taken
        opening.add_done_callback(self._opened)

    def _opened(self, opening: "asyncio.Future[UpstreamResponse]") -> None:
        if self.opening is opening:
            self.opening = None  # answered: not kept for the request's life
        if not opening.cancelled() and opening.exception() is None:
            self.accept(opening.result())

    def accept(self, response: UpstreamResponse) -> None:
        """The upstream took the request. A response that arrives after the flight ended is
        closed at once, its slot given back."""
        if response is self.response:
            return
        if self._ended:
            response.close()
            return
        self.response = response
        self.opened = response.arrived  # not now: it may have waited for the admission

    def estimated_usage(self) -> wire.Usage:
        """What can be proven without the upstream's word: the prompt estimate and the
        completion tokens delivered."""
        completion = self.meter.delivered_tokens()
        return wire.Usage(prompt_tokens=self.prompt_estimate, completion_tokens=completion,
                          total_tokens=self.prompt_estimate + completion)

    @property
    def ended(self) -> bool:
        return self._ended

    def overhead_ms(self, now: float | None = None) -> float:
        """Time the bridge itself spent until `now` (by default, now): everything but waiting
        for the upstream."""
        if now is None:
            now = time.monotonic()
        upstream = 0.0
        if self.forwarded is not None:
            upstream = (self.upstream_done or self.opened or now) - self.forwarded
        return max(0.0, now - self.started - upstream) * 1000

    # ---- the one way out -------------------------------------------------------------------

    def end(self, cause: str, *, refused: bool = False) -> None:
        """Settle at what is known now. Acts once; every later call is a no-op. `refused`: the
        upstream failed before any of its answer reached the client (an error as its first
        event, an empty answer, a whole answer that failed): voided unless it reported usage,
        as a refusal by status is; the user is not billed for our upstream's failure."""
        if self._ended:
            return
        self._ended = True
        self.cause = cause
        self._stop_timers()
        opening = self.opening
        if opening is not None:  # not answered yet: stopped (one that has, unheard, is closed by `_opened`)
            self.opening = None
            opening.cancel()
        self._flights.live.discard(self)
        self.ended_at = time.monotonic()
        if self.upstream_done is None and self.forwarded is not None:
            self.upstream_done = self.ended_at
        if self.response is not None:
            self.response.end()
        usage = self.meter.completed_usage()
        # the response the upstream answers with; or, for a stream it took whose first event had
        # not come (the router's, which its cancellation closes), the one it was working on
        response = self.response or (self.taken.response if self.taken is not None else None)
        upstream = response.profile if response is not None else None
        subscription = self.principal.subscription_id
        if usage is not None:
            counts = Counts(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                            usage.reasoning_tokens)
            settlement = Settlement(self.entry, "posted", counts, estimated=False, reason=cause,
                                    upstream_request_id=self.meter.upstream_id, upstream=upstream,
                                    upstream_cost=self._cost(response, counts), subscription_id=subscription)
        elif response is None or refused:
            settlement = Settlement(self.entry, "voided", Counts(), estimated=False, reason=cause,
                                    upstream=upstream, subscription_id=subscription)
        else:
            estimate = self.estimated_usage()
            counts = Counts(estimate.prompt_tokens, estimate.completion_tokens)
            settlement = Settlement(self.entry, "posted", counts, estimated=True, reason=cause,
                                    upstream_request_id=self.meter.upstream_id, upstream=upstream,
                                    upstream_cost=self._cost(response, counts), subscription_id=subscription)
        self._flights.settle(self, settlement, usage)

    @staticmethod
    def _cost(response: UpstreamResponse | None, counts: Counts) -> float | None:
        """What the upstream charges for these counts, at the answering profile's prices."""
        price = response.price if response is not None else None
        if price is None:
            return None
        return price.cost(counts.prompt_tokens, counts.cached_tokens, counts.completion_tokens)

    def client_gone(self) -> None:
        """The client left (or the request was cancelled) before its answer was complete.
        Mid-stream, with the usage still to come, the upstream is read on for it (bounded);
        otherwise the flight ends now."""
        if self._ended or self._draining:
            return
        flights = self._flights
        response = self.response
        if (response is None or self.meter.usage is not None or not self.meter.delivered_anything
                or flights.drains >= flights.settings.max_drains):
            taken = response is not None or (self.taken is not None and self.taken.response is not None)
            self.end("client left before the upstream answered" if not taken
                     else "client left" if self.meter.delivered_anything
                     else "client left before the first token")
            return
        self._draining = True
        # counted now, not when the drain starts running: when thousands of clients leave in
        # one loop pass, each must see the drains already granted, or the cap is not one
        flights.drains += 1
        flights.spawn(self._drain(response)).add_done_callback(flights.drained)

    async def _drain(self, response: UpstreamResponse) -> None:
        flights = self._flights
        try:
            async with asyncio.timeout(flights.settings.drain_timeout):
                while not self._ended and (data := await response.content.readany()):
                    for chunk in chunks(self.decoder, data):
                        self.meter.observe(chunk, delivered=False)
                    if self.meter.usage is not None:
                        break
                else:
                    for chunk in last_chunks(self.decoder):  # (one held for its next event)
                        self.meter.observe(chunk, delivered=False)
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        finally:
            self.end("client left; upstream read on for its usage")

    # ---- timers ----------------------------------------------------------------------------

    def _stop_timers(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        if self._cap is not None:
            self._cap.cancel()
            self._cap = None

    def _beat(self) -> None:
        self._keeper = None
        if not self._ended:
            if self._cap is None:  # the first beat: the cap's timer, for its moment from the start
                self._cap = asyncio.get_running_loop().call_at(
                    self._born + self._flights.settings.max_request_seconds, self._overdue)
            self._flights.spawn(self._heartbeat())

    async def _heartbeat(self) -> None:
        """Extend the lease and record the completion tokens delivered so far; then the next.
        Survives any failure: a missed beat only brings the sweeper closer."""
        try:
            if await self._flights.ledger.heartbeat(self.entry, self.meter.delivered_tokens()):
                self.lease_deadline = time.monotonic() + self._flights.settings.reservation_lease
        except Exception as exc:  # noqa: BLE001 - logged; the next beat tries again
            log.warning("heartbeat failed", extra={"entry": self.entry_text, "error": type(exc).__name__})
        finally:
            if not self._ended:
                self._keeper = asyncio.get_running_loop().call_later(
                    self._flights.settings.heartbeat_interval, self._beat)

    def _overdue(self) -> None:
        self._cap = None
        log.warning("request passed its lifetime cap; settling and closing it",
                    extra={"entry": self.entry_text, "seconds": self._flights.settings.max_request_seconds})
        self.end(LIFETIME_CAP)


class SettlementWrite:
    """One settlement on its way to the ledger: queued, its answer taken by a callback (no task
    per request); a database blip is retried after a delay, doubling (a settlement is
    idempotent), until it is written or the entry's lease is about to pass to the sweeper
    (`deadline()`, a monotonic moment, read at each failure: a live flight's heartbeats move it).
    `landed(billed, outcome)` is called once: "settled" (billed: the credits), "settled_before"
    (a replay, or the sweeper won), "left_to_sweeper" or "cancelled". `quiet`: its retries are
    logged at debug level (a void after every admission that failed in a database outage would
    otherwise log dozens of lines each, beside the one warning its request logged); giving up is
    a warning, one line per entry left to the sweeper."""

    __slots__ = ("ledger", "settlement", "deadline", "landed", "delay", "retry_level", "give_up_level")

    def __init__(self, ledger: LedgerPort, settlement: Settlement, deadline: Callable[[], float],
                 landed: Callable[[int | None, str], None], *, quiet: bool = False) -> None:
        self.ledger = ledger
        self.settlement = settlement
        self.deadline = deadline
        self.landed = landed
        self.delay = _SETTLE_FIRST_DELAY
        self.retry_level = logging.DEBUG if quiet else logging.WARNING
        self.give_up_level = logging.WARNING if quiet else logging.ERROR

    def start(self) -> None:
        try:
            writing = self.ledger.settle(self.settlement)
        except Exception as exc:  # noqa: BLE001 - a port that fails at once fails like a write
            self._failed(exc)
            return
        writing.add_done_callback(self._written)

    def _written(self, writing: "asyncio.Future[int | None]") -> None:
        if writing.cancelled():
            # nothing cancels a settlement's future (the ticker resolves each one); were one
            # cancelled, the entry would be the sweeper's, as one left when the loop stops is
            log.error("settlement cancelled; the sweeper will expire the entry",
                      extra={"entry": str(self.settlement.entry_id)})
            self.landed(None, "cancelled")
            return
        exc = writing.exception()
        if exc is not None:
            self._failed(exc)
            return
        billed = writing.result()
        # None: settled before (the first write's reply was lost, or the sweeper won)
        self.landed(billed, "settled" if billed is not None else "settled_before")

    def _failed(self, exc: BaseException) -> None:
        settlement = self.settlement
        if time.monotonic() + self.delay > self.deadline() - _LEASE_MARGIN:
            log.log(self.give_up_level, "settlement not written; the sweeper will expire the entry",
                    extra={"entry": str(settlement.entry_id), "state": settlement.state,
                           "error": type(exc).__name__})
            self.landed(None, "left_to_sweeper")
            return
        log.log(self.retry_level, "settlement failed; retrying",
                extra={"entry": str(settlement.entry_id), "state": settlement.state,
                       "error": type(exc).__name__, "retry_in_s": self.delay})
        asyncio.get_running_loop().call_later(self.delay, self.start)
        self.delay = min(self.delay * 2, _SETTLE_MAX_DELAY)


def void_abandoned(ledger: LedgerPort, reservation: Reservation, lease: float) -> None:
    """An admission whose caller never heard it (nothing was forwarded), or whose answer was lost
    with the database's reply: its entry, should the ledger have written it, is voided, naming
    its subscription (one of unknown subscription would mark every first try of the ledger's
    next batch plan-only). A void of an entry never written changes nothing. Retried like any
    settlement until the entry's `lease` (seconds from now) is about to end: left to the sweeper
    instead, the entry would be expired and billed its prompt estimate for an answer nobody got.
    Called by the ledger's ticker (the caller was cancelled, or given up, while it was pending;
    the database's answer was lost) and by the journey (the answer came in the moment the client
    left)."""
    deadline = time.monotonic() + lease
    SettlementWrite(ledger, Settlement(reservation.entry_id, "voided", Counts(), estimated=False,
                                       reason="admission abandoned",
                                       subscription_id=reservation.subscription_id, abandoned=True),
                    lambda: deadline, _void_landed, quiet=True).start()


def _void_landed(billed: int | None, outcome: str) -> None:
    pass  # a void bills nothing; one given up on was logged with its entry (`SettlementWrite`)


class Flights:
    """All flights of this process: background work, drains, and the settlement writer."""

    def __init__(self, settings: BridgeSettings, ledger: LedgerPort, calibration, upstream_name: str,
                 metrics: BridgeMetrics | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.calibration = calibration
        self.upstream_name = upstream_name
        self.metrics: BridgeMetrics = metrics or NoMetrics()
        self.drains = 0
        self.live: set[Flight] = set()  # admitted and not ended yet
        self._background: set[asyncio.Task] = set()
        self._settling: set[Flight] = set()  # ended, settlement not written (or given up) yet
        self._quiet: asyncio.Future | None = None  # set when the last one lands, if awaited

    def spawn(self, coroutine: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._done)
        return task

    @property
    def in_flight(self) -> int:
        """Flights not ended, plus the work they left (settlement writes, drains)."""
        return len(self.live) + len(self._background) + len(self._settling)

    def drained(self, task: asyncio.Task) -> None:
        """A drain ended (even one cancelled before it began): its place under the cap is free."""
        self.drains -= 1

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def settle(self, flight: Flight, settlement: Settlement, usage: wire.Usage | None) -> None:
        if usage is not None:
            self.calibration.observe(flight.model, flight.kind, flight.principal.account_id,
                                     flight.raw_prompt, usage.prompt_tokens)
        self._settling.add(flight)
        SettlementWrite(self.ledger, settlement, lambda: flight.lease_deadline,
                        functools.partial(self._written, flight, settlement)).start()

    def _written(self, flight: Flight, settlement: Settlement, billed: int | None, outcome: str) -> None:
        self._landed(flight)
        if outcome != "cancelled":
            self._access_line(flight, settlement, billed, outcome)

    def _landed(self, flight: Flight) -> None:
        self._settling.discard(flight)
        if not self._settling and self._quiet is not None and not self._quiet.done():
            self._quiet.set_result(None)

    def _access_line(self, flight: Flight, settlement: Settlement, billed: int | None, outcome: str) -> None:
        now = flight.ended_at or time.monotonic()
        upstream_ms = 0.0
        if flight.forwarded is not None:
            upstream_ms = ((flight.upstream_done or now) - flight.forwarded) * 1000
        overhead_ms = flight.told_overhead_ms
        if overhead_ms is None:  # no reply was made (the client went away first)
            overhead_ms = flight.overhead_ms(now)
        metrics = self.metrics
        metrics.request(flight.surface, flight.model, flight.status, overhead_ms / 1000,
                        flight.first_token - flight.started if flight.first_token is not None else None)
        metrics.settled(time.monotonic() - now)
        if billed is not None and settlement.state != "voided":
            c = settlement.counts
            metrics.usage(flight.model, c.prompt_tokens, c.cached_tokens, c.completion_tokens, billed)
        if not access.isEnabledFor(logging.INFO):
            return  # the line's fields are not even gathered
        access.info("request", extra={
            "request_id": flight.entry_text, "surface": flight.surface, "model": flight.model,
            "status": flight.status, "account_id": flight.principal.account_id,
            "prompt_tokens": settlement.counts.prompt_tokens,
            "completion_tokens": settlement.counts.completion_tokens,
            "cached_tokens": settlement.counts.cached_tokens, "billed": billed,
            "estimated": settlement.estimated, "state": settlement.state, "cause": settlement.reason,
            "overhead_ms": round(overhead_ms, 2), "upstream_ms": round(upstream_ms, 2),
            "outcome": outcome})

    def end_all(self, cause: str) -> int:
        """At shutdown, after the open streams had their deadline: settle every flight still
        live at what is known now. Returns how many there were."""
        live = list(self.live)
        for flight in live:
            flight.end(cause)
        return len(live)

    async def land(self, timeout: float = 10.0) -> None:
        """At shutdown: let settlements and drains in flight finish (the sweeper covers the rest;
        voids of abandoned admissions, `void_abandoned`, are not waited for)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        if self._settling:  # drains end in settlements: these are waited for after them
            if self._quiet is None or self._quiet.done():
                self._quiet = loop.create_future()
            await asyncio.wait({self._quiet}, timeout=max(0.0, deadline - loop.time()))
        if self._settling:  # (a retry still waiting for its moment is dropped with the loop)
            log.error("settlements not written at shutdown; the sweeper will expire their entries",
                      extra={"count": len(self._settling)})
