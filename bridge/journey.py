"""A request's whole journey, the same for every surface:

    authenticate -> parse -> admit -> forward -> relay -> settle

Surfaces differ only in their translator (bridge/surfaces/*); GLM's quirks are fixed once, in
bridge/glm.py, between the upstream and every translator. From admission on, a `Flight`
(bridge/flight.py) owns the request: every exit below ends in it, and it settles the ledger
entry, gives the upstream key's slot back and stops the lease keeper exactly once.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import aiohttp
import msgspec

from . import depth, glm, wire
from .errors import BridgeError, Kind
from .flight import LIFETIME_CAP, Flight, Flights, Taken, chunks, last_chunks, void_abandoned
from .metering import Calibration, PromptEstimator
from .metrics import BridgeMetrics, NoMetrics
from .models import CATALOG, ModelResolver
from .ports import Admission, KeyAuthority, LedgerPort, Principal, Reservation
from .settings import BridgeSettings
from .surfaces import Parsed, StreamTranslator, Surface
from .upstream import Upstream, UpstreamResponse
from .upstreams import stream_taken

log = logging.getLogger("codeplan.journey")
access = logging.getLogger("codeplan.access")


# on every bridged response: the milliseconds the bridge itself spent on it before the headers
# (for a stream, up to its headers), everything but waiting for the upstream
OVERHEAD_HEADER = "x-codeplan-overhead-ms"
# bodies from this size are guarded and decoded on a worker thread (a thread hop costs ~50-100 us,
# the guard alone ~7-17 ms per MB)
OFFLOAD_BYTES = 1 << 20
_Parsed = TypeVar("_Parsed")


class _Arriving:
    """A request not yet admitted: when it came, where it waits now, and, once it waits for its
    admission, the ledger's future it waits on (`Journey.answer_overdue`)."""

    __slots__ = ("started", "surface", "stage", "warned", "admitting", "admitting_since")

    def __init__(self, started: float, surface: str) -> None:
        self.started = started
        self.surface = surface
        self.stage = "authentication"
        self.warned = False
        self.admitting: asyncio.Future | None = None
        self.admitting_since = 0.0


class AdmissionOverdue(Exception):
    """The ledger did not answer an admission in `admission_timeout` seconds."""


class Reply(msgspec.Struct):
    status: int
    headers: dict[str, str]
    media_type: str = "application/json"
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    # a stream's flight, told when its sender ends without running the stream to its end: a
    # generator closed before its first step runs none of its own code, so the client's leaving
    # while the headers were written would reach nobody (`Flight.client_gone`; a no-op once ended)
    abandon: Callable[[], None] | None = None


# how long the end of a stream is waited for once it said `[DONE]`
_AFTER_DONE = 0.1


class _UpstreamSilent(Exception):
    pass


def iso_utc(moment: dt.datetime) -> str:
    """A window's edge as users read it: UTC, ISO 8601, to the second, rounded up. A window
    ends at its opening `now()` plus its length, to the microsecond: cut to the second, the
    reset told would be up to a second early, a moment when a request is still refused (a
    status line retrying then is refused once more)."""
    moment = moment.astimezone(dt.timezone.utc)
    if moment.microsecond:
        moment += dt.timedelta(microseconds=1_000_000 - moment.microsecond)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _unavailable(exc: Exception) -> BridgeError:
    """Our own database failed: a retryable 503 in the caller's protocol, never a 500, and
    nothing forwarded, so nothing to bill."""
    log.warning("database unavailable", extra={"error": type(exc).__name__})
    return BridgeError(Kind.unavailable, "The service cannot reach its database right now; "
                       "please retry in a few seconds.", retry_after=2)


def _upstream_name(flight: Flight, upstream: Upstream) -> str:
    """The profile that answered, or the upstream as a whole before one did."""
    response = flight.response
    return (response.profile if response is not None else None) or upstream.name


def _abandon(opening: asyncio.Future) -> None:
    """A speculative upstream request whose admission failed: stopped, and its response, should
    it arrive anyway, closed (its key's slot given back)."""
    opening.cancel()

    def close(done: asyncio.Future) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()
    opening.add_done_callback(close)


def account_suspended() -> BridgeError:
    """How a suspended account is refused: an operator's decision (admin API), not a billing
    state. Said by a request's admission, and by the Responses socket's handshake (bridge/app.py)."""
    return BridgeError(Kind.permission, "This account is suspended; contact the service's operator.",
                       code="account_suspended")


def _refused_upstream(flight: Flight, error: BridgeError) -> None:
    """The upstream router gave up: the flight ends, its upstream time where the router gave up
    (which may be before the admission was heard), not when the request got round to it."""
    if error.upstream_at is not None and not flight.ended:  # (ended: its figures are taken)
        flight.upstream_done = error.upstream_at
    flight.end(f"upstream refused: {error.kind.value}")


class Journey:
    def __init__(self, *, settings: BridgeSettings, auth: KeyAuthority, ledger: LedgerPort,
                 upstream: Upstream, calibration: Calibration | None = None,
                 metrics: BridgeMetrics | None = None) -> None:
        self.settings = settings
        self.auth = auth
        self._ledger = ledger
        self._upstream = upstream
        self.calibration = calibration or Calibration()
        self._models = ModelResolver(settings.model_aliases, claude=settings.claude_model,
                                     claude_haiku=settings.claude_haiku_model)
        self._estimator = PromptEstimator()
        depth.prepare(settings.max_json_depth)  # compiled now, so no request waits for it
        self.metrics: BridgeMetrics = metrics or NoMetrics()
        self.flights = Flights(settings, ledger, self.calibration, upstream.name, self.metrics)
        # each subscription's room after its last admission: where forwarding may start early
        self._room: dict[int, int] = {}
        # requests not yet admitted, for `warn_stalled`
        self._arriving: set[_Arriving] = set()

    # ---- the journey -----------------------------------------------------------------------

    async def handle(self, surface: Surface, key: str, read_body: Callable[[], Awaitable[bytes]]) -> Reply:
        started = time.monotonic()
        principal: Principal | None = None
        arriving = _Arriving(started, surface.name)
        self._arriving.add(arriving)
        try:
            principal = await self._authenticate(key)
            # the key is checked before the body is read: strangers cannot make us read megabytes
            arriving.stage = "body"
            parsed = await self._parse(surface.parse, await read_body())
            arriving.stage = "admission"
            flight, opening = await self._admit(surface, principal, parsed.request, parsed.max_tokens,
                                                parsed.least_answer, arriving)
        except BridgeError as error:
            self._refused(surface, principal, error, started)
            reply = self._error(surface, error)
            reply.headers[OVERHEAD_HEADER] = f"{(time.monotonic() - started) * 1000:.2f}"
            return reply
        finally:
            self._arriving.discard(arriving)
        try:
            if parsed.request.stream:
                reply = await self._stream(surface, flight, opening, parsed)
            else:
                reply = await self._complete(surface, flight, opening, parsed)
        except BaseException:
            flight.client_gone()  # (which cancels the upstream request if it has not answered)
            raise
        flight.told_overhead_ms = flight.overhead_ms()
        reply.headers[OVERHEAD_HEADER] = f"{flight.told_overhead_ms:.2f}"
        return reply

    def warn_stalled(self, after: float) -> None:
        """Log, once each, the requests still before their admission `after` seconds after they
        came, with where they wait. Nothing there takes more than a database round trip or two,
        a ledger tick and reading a body, so such a request is stuck (or its client sends its
        body that slowly), and the stage and the count per stage say where to look. (CI once saw
        a request get no headers in 120 s with nothing logged, which this would have placed.)"""
        now = time.monotonic()
        stalled = [a for a in self._arriving if not a.warned and now - a.started >= after]
        if not stalled:
            return
        stages: dict[str, int] = {}
        for a in self._arriving:
            stages[a.stage] = stages.get(a.stage, 0) + 1
        arriving = ",".join(f"{stage}:{n}" for stage, n in sorted(stages.items()))
        for a in stalled:
            a.warned = True
            log.warning("request stalled before its admission", extra={
                "stage": a.stage, "surface": a.surface, "seconds": round(now - a.started, 1),
                "arriving": arriving})

    def answer_overdue(self, after: float) -> int:
        """Answer every request waiting `after` seconds for its admission with a 503 (retry
        later), and return how many. Admission is one ledger tick, milliseconds; one that takes
        this long has a database that does not answer (or a stuck tick), and a client told so
        can retry, where one left waiting holds its connection, and the coding tool its user,
        for as long as its own timeout. The ledger's future is answered with `AdmissionOverdue`:
        should its tick still admit the request later, nobody waits for it, and the ledger voids
        the entry (service/ledger.py). Called by the process's watch (service/app.py) every few
        seconds, so no request pays for a timer of its own."""
        now = time.monotonic()
        overdue = [a for a in self._arriving if a.admitting is not None and not a.admitting.done()
                   and now - a.admitting_since >= after]
        for a in overdue:
            a.admitting.set_exception(AdmissionOverdue())  # type: ignore[union-attr]
        if overdue:
            log.warning("admissions overdue; answered 503", extra={
                "count": len(overdue), "seconds": after})
        return len(overdue)

    async def count_tokens(self, surface: Surface, parse: Callable[[bytes], wire.ChatRequest],
                           key: str, read_body: Callable[[], Awaitable[bytes]]) -> tuple[Reply, int | None]:
        """The prompt estimate admission would reserve for this request: what `count_tokens`
        answers."""
        try:
            principal = await self._authenticate(key, spending=False)
            request = await self._parse(parse, await read_body())
            model = self._models.resolve(request.model, principal.models or tuple(CATALOG))
            count = await self._estimator.count_request(request)
            return Reply(status=200, headers={}), self.calibration.correct(
                model.id, count.kind, count.raw, principal.account_id)
        except BridgeError as failure:
            return self._error(surface, failure), None

    async def _parse(self, parse: Callable[[bytes], _Parsed], body: bytes) -> _Parsed:
        """Guard and decode a body; a big one on a worker thread: the depth guard (~60-150 MB/s)
        and the decoders would otherwise hold the event loop, and every other client, for a
        tenth of a second per 10 MB prompt."""
        if len(body) < OFFLOAD_BYTES:
            return parse(self._guarded(body))
        return await asyncio.to_thread(lambda: parse(self._guarded(body)))

    def _guarded(self, body: bytes) -> bytes:
        """Every surface's body passes here before any decoder: nesting past the limit is a
        request fault, not a RecursionError somewhere deep in a decoder or a schema walk."""
        if depth.too_deep(body, self.settings.max_json_depth):
            raise BridgeError(Kind.invalid_request, "The request body nests deeper than "
                              f"{self.settings.max_json_depth} levels.")
        return body

    async def _authenticate(self, key: str, *, spending: bool = True) -> Principal:
        try:
            principal = await self.auth.authenticate(key) if key else None
        except Exception as exc:  # noqa: BLE001 - the port raises on infrastructure failures
            raise _unavailable(exc) from None
        if principal is None:
            raise BridgeError(Kind.authentication, "Invalid API key. Create one with "
                              "`codeplan keys create` and send it as a Bearer token.")
        if spending and principal.subscription_id is None:
            raise BridgeError(Kind.payment_required,
                              "This account has no active subscription. Choose a plan at "
                              f"{self.settings.public_url}/billing.", code="no_subscription")
        return principal

    async def _admit(self, surface: Surface, principal: Principal, request: wire.ChatRequest,
                     max_tokens: int | None, least_answer: int | None,
                     arriving: _Arriving) -> tuple[Flight, asyncio.Future]:
        shown_model = request.model
        model = self._models.resolve(request.model, principal.models)
        request.model = model.id
        glm.prepare(request)
        count = await self._estimator.count_request(request)
        prompt = self.calibration.correct(model.id, count.kind, count.raw, principal.account_id)
        asked = min(max_tokens or model.max_output, model.max_output)
        # the most a prompt may be: the window, less the least answer where the client needs one
        # (said as the limit, so a client compacting by how far over it is makes room for that too)
        most = max(1, model.context_window - min(least_answer or 0, asked))
        if prompt >= model.context_window:
            raise BridgeError(
                Kind.context_length,
                f"This model's maximum context length is {model.context_window} tokens. However, "
                f"your messages resulted in {prompt} tokens. Please reduce the length of the messages.",
                param="messages", limit=most, requested=prompt)
        # the most the upstream may produce: never more than it can
        room = model.context_window - prompt
        if least_answer is not None and asked > room and room < least_answer:
            # too little room beside the prompt for any answer the client can take
            # (Parsed.least_answer): said so, in the words on which it compacts the conversation
            raise BridgeError(
                Kind.context_length,
                f"This model's maximum context length is {model.context_window} tokens, and a prompt of "
                f"{prompt} tokens leaves no room for an answer.", param="messages",
                limit=most, requested=prompt)
        request.max_tokens = min(asked, room)
        entry = uuid.uuid4()
        entry_text = str(entry)
        assert principal.subscription_id is not None
        # held: the proven worst case, so no window can pass its allowance whatever the text
        held = max(count.bound, prompt) + request.max_tokens
        reservation = Reservation(
            entry_id=entry, subscription_id=principal.subscription_id, api_key_id=principal.api_key_id,
            surface=surface.name, model=model.id, prompt_estimate=prompt,
            reserve=prompt + request.max_tokens, held=held)
        # Where the window has room to spare, the upstream starts while admission commits (no
        # byte reaches the client before it has; a refusal cancels the upstream). Near the edge,
        # where a refusal is likely, admission comes first.
        room = self._room.get(principal.subscription_id)
        taken = Taken() if request.stream else None
        opening: asyncio.Future | None = None
        admitting: asyncio.Future[Admission] | None = None
        forwarded: float | None = None
        try:
            # queued first: the database starts on the admission before the upstream request is built
            admitting = arriving.admitting = self._ledger.admit(reservation)
            arriving.admitting_since = time.monotonic()
            if room is not None and room >= 2 * held:
                forwarded = arriving.admitting_since  # the same moment: one clock read
                opening = self._forward(request, entry_text, principal.account_id, taken)
            admission = await admitting
        except BaseException as exc:
            if opening is not None:
                _abandon(opening)
            if admitting is not None:
                self._unheard(admitting, reservation)
            if isinstance(exc, Exception):
                raise _unavailable(exc) from None
            raise
        self._note_room(principal.subscription_id, admission.room)
        if not admission.admitted:
            if opening is not None:
                _abandon(opening)
            raise self._refusal(admission, held)
        flight = Flight(self.flights, entry=entry, principal=principal, surface=surface.name,
                        model=model.id, shown_model=shown_model, prompt_estimate=prompt,
                        raw_prompt=count.raw, kind=count.kind, started=arriving.started, entry_text=entry_text)
        if opening is None:
            forwarded = time.monotonic()
            opening = self._forward(request, entry_text, principal.account_id, taken)
        flight.forwarded = forwarded
        # the upstream request, and whenever it arrives its response, belong to the flight
        flight.attach(opening, taken)
        return flight, opening

    def _forward(self, request: wire.ChatRequest, entry_text: str, account: int,
                 taken: Taken | None) -> asyncio.Future[UpstreamResponse]:
        """The upstream request, on its way in a task of its own. A stream's tells `taken` once an
        upstream took it, before the router has its first event (bridge/upstreams.py
        `stream_taken`, set for the task only: it copies the context it is made in)."""
        if taken is None:
            return asyncio.ensure_future(self._upstream.open(request, entry_text, account))
        token = stream_taken.set(taken)
        try:
            return asyncio.ensure_future(self._upstream.open(request, entry_text, account))
        finally:
            stream_taken.reset(token)

    def _unheard(self, admitting: "asyncio.Future[Admission]", reservation: Reservation) -> None:
        """The request went away while its admission was pending: still pending, the admission
        is cancelled (the ledger voids an entry it admits meanwhile); answered already, but not
        yet heard (the client left in the same moment), an entry admitted is voided here, or it
        would hold its windows and its place under the plan's cap until the sweeper's expiry.
        (An admission answered with the database's failure, or given up as overdue, is the
        ledger's to void: only it knows whether it wrote the entry.)"""
        if not admitting.done():
            admitting.cancel()
            return
        if admitting.cancelled() or admitting.exception() is not None or not admitting.result().admitted:
            return
        void_abandoned(self._ledger, reservation, self.settings.reservation_lease)

    def _note_room(self, subscription_id: int, room: int | None) -> None:
        if len(self._room) > 100_000:
            self._room.clear()  # bounded: a forgotten room only means admitting first once
        if room is None:
            self._room.pop(subscription_id, None)
        else:
            self._room[subscription_id] = room

    def _refusal(self, admission: Admission, held: int) -> BridgeError:
        window = "5 hour" if admission.window_kind == "5h" else "weekly"
        if admission.outcome == "window_full":
            assert admission.resets_at is not None
            wait = (admission.resets_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
            # Z.ai's words first (status lines read the reset from them); then, when the window
            # still has room but not this request's worst case (a long conversation's prompt
            # bound plus the max_tokens a tool always asks), both numbers: a user told only
            # "limit reached" at 60% used cannot tell that a shorter conversation would go through
            short = (f" This request may use up to {held} tokens (its prompt and max_tokens); "
                     f"{admission.room} remain." if admission.room is not None and admission.room > 0 else "")
            return BridgeError(
                Kind.quota_exhausted,
                f"Usage limit reached for the {window} window. Your limit will reset at "
                f"{iso_utc(admission.resets_at)} (UTC).{short}",
                code="1308" if admission.window_kind == "5h" else "1310", retry_after=max(1.0, wait))
        if admission.outcome == "too_large":
            return BridgeError(
                Kind.too_large,
                f"This request (its prompt and max_tokens) could use more than the whole {window} window "
                f"({admission.allowance} credits) and any top-up can hold; lower max_tokens or shorten the "
                f"prompt.", param="max_tokens")
        if admission.outcome == "concurrency":
            return BridgeError(Kind.concurrency,
                               f"Too many requests in flight for this plan (at most {admission.allowance}).",
                               code="1302", retry_after=1)
        if admission.outcome == "voided":
            # its void came first (migrations/0044); only a try nobody waits for is answered so,
            # but should one reach a client, it is a retryable failure, not a billing state
            return BridgeError(Kind.unavailable, "The service could not admit this request; "
                               "please retry in a few seconds.", retry_after=2)
        state = admission.detail or "inactive"
        if state == "suspended":
            return account_suspended()
        return BridgeError(Kind.payment_required,
                           f"This account's subscription is {state.replace('_', ' ')} and cannot be used "
                           f"until billing is resolved at {self.settings.public_url}/billing.",
                           code=f"subscription_{state}")

    # ---- forward and relay -----------------------------------------------------------------

    async def _complete(self, surface: Surface, flight: Flight, opening: asyncio.Future,
                        parsed: Parsed) -> Reply:
        try:
            response = await opening
        except BridgeError as error:
            flight.status = error.status
            _refused_upstream(flight, error)
            return self._error(surface, error)
        except asyncio.CancelledError:
            # the flight's end cancelled the upstream request (its cap), not this task's cancel
            if flight.ended and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                return self._ended(surface, flight)
            raise
        flight.accept(response)
        try:
            body = await response.read()
            if flight.ended:  # its end closed the response, or came as its last bytes did
                return self._ended(surface, flight)
            completion = wire.completion_decoder.decode(body)
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError) as exc:
            if flight.ended:
                return self._ended(surface, flight)
            return self._broken(surface, flight, f"upstream failed: {type(exc).__name__}")
        # when its last byte came, which may be before the admission was heard
        flight.upstream_done = response.body_done or time.monotonic()
        # (a refusal inside a 200 never comes here: the router failed that attempt, upstreams.py)
        for choice in completion.choices[:1]:
            message = choice.message
            flight.meter.observe(wire.Chunk(id=completion.id, choices=[wire.ChunkChoice(delta=wire.Delta(
                content=message.content, reasoning_content=message.reasoning_content,
                tool_calls=[wire.ToolCallDelta(index=i, function=wire.FunctionDelta(
                    name=c.function.name, arguments=c.function.arguments))
                    for i, c in enumerate(message.tool_calls)] if isinstance(message.tool_calls, list) else msgspec.UNSET))]),
                delivered=True)
        if isinstance(completion.usage, wire.Usage):
            flight.meter.observe(wire.Chunk(usage=completion.usage), delivered=False)
        events, outcome = glm.completion_events(completion, self._call_prefix(flight), one_call=parsed.one_call)
        if outcome.error is not None:
            return self._broken(surface, flight, outcome.error.code or "broken", outcome.error)
        usage = flight.meter.completed_usage() or self._unreported(flight)
        flight.end("complete")
        return Reply(status=200, headers={"x-request-id": flight.entry_text},
                     body=surface.complete(glm.Answer(events), outcome.reason or glm.STOP,
                                           flight.shown_model, flight.entry_hex, usage))

    def _cut(self, flight: Flight) -> BridgeError:
        """What the client is told when its flight ended while the journey still waited on the
        upstream (the lifetime cap; the server's shutdown): never that the upstream failed."""
        if flight.cause == LIFETIME_CAP:
            return BridgeError(Kind.upstream_timeout, "Request time limit reached: the answer was not finished "
                               f"within {self.settings.max_request_seconds:g} seconds. Request id {flight.entry}.",
                               code="request_time_limit")
        return BridgeError(Kind.unavailable, "The service ended this request before its answer was finished "
                           f"({flight.cause}). Request id {flight.entry}; please retry.", retry_after=2)

    def _ended(self, surface: Surface, flight: Flight) -> Reply:
        """A whole answer whose flight ended before it came (settled already, at its end)."""
        error = self._cut(flight)
        flight.status = error.status
        return self._error(surface, error)

    def _broken(self, surface: Surface, flight: Flight, cause: str,
                error: BridgeError | None = None) -> Reply:
        """A whole answer that failed: the client gets an error and none of it, so it is billed
        only at the usage the upstream reported, if any."""
        error = error or BridgeError(
            Kind.upstream_error, f"The model provider failed to answer. Request id {flight.entry}.")
        flight.status = error.status
        flight.end(cause, refused=True)
        return self._error(surface, error)

    async def _stream(self, surface: Surface, flight: Flight, opening: asyncio.Future,
                      parsed: Parsed) -> Reply:
        # a quick refusal keeps its HTTP status (a stream's is said by its status or its first
        # event: the router accepts a stream at its first event, bridge/upstreams.py); a slow
        # upstream must not keep the client waiting for headers (Kilo gives up after 10 s), nor
        # without a byte past the keep-alive interval (an upstream that sends its headers at once
        # and then only comment pings while it queues)
        settings = self.settings
        await asyncio.wait({opening}, timeout=min(settings.header_wait, settings.keepalive_interval))
        if flight.ended:  # its cap (or the shutdown) came first
            return self._ended(surface, flight)
        if opening.done():
            try:
                flight.accept(opening.result())
            except BridgeError as error:
                flight.status = error.status
                _refused_upstream(flight, error)
                return self._error(surface, error)
        translator = surface.stream(flight.shown_model, flight.entry_hex, flight.prompt_estimate, parsed)
        return Reply(status=200, media_type=translator.content_type,
                     headers={"cache-control": "no-cache", "x-request-id": flight.entry_text},
                     stream=self._relay(translator, flight, opening, parsed.one_call), abandon=flight.client_gone)

    async def _relay(self, translator: StreamTranslator, flight: Flight,
                     opening: asyncio.Future | None, one_call: bool = False) -> AsyncIterator[bytes]:
        settings = self.settings
        self.metrics.stream(1)
        try:
            first = translator.start()
            # when the client last got a byte of its answer; none yet: its wait counts from its
            # request (a stream is accepted at its first event, which may have come after a while
            # of comment pings or nothing, bridge/upstreams.py `_first_event`)
            said_at = flight.started
            if flight.response is None:
                # the client gets its headers now; the upstream has not answered yet
                yield first or translator.keepalive
                said_at = time.monotonic()
                while not (await asyncio.wait({opening}, timeout=settings.keepalive_interval))[0]:
                    yield translator.keepalive
                    said_at = time.monotonic()
                if flight.ended:  # its end (the cap, the shutdown) cancelled the upstream request
                    yield translator.fail(self._cut(flight))
                    return
                try:
                    flight.accept(opening.result())
                except BridgeError as error:
                    _refused_upstream(flight, error)
                    yield translator.fail(error)
                    return
            elif first:
                yield first
                said_at = time.monotonic()
            response = flight.response
            assert response is not None
            opening = None  # done, its result is the flight's: not kept for the stream's life
            normalizer = glm.StreamNormalizer(self._call_prefix(flight), one_call=one_call)
            meter = flight.meter
            said_done = False

            def done() -> None:
                nonlocal said_done
                said_done = True
                normalizer.done()
            loop = asyncio.get_running_loop()
            # silence is counted from the upstream's last event, not its last byte (a proxy's
            # comment pings while its backend hangs are no answer); the client gets a keep-alive
            # once it has had nothing for the interval, whatever the upstream sent meanwhile
            interval, silent_after = settings.keepalive_interval, settings.upstream_timeout
            heard = loop.time()
            told = heard - (time.monotonic() - said_at)
            try:
                while True:
                    # until the client is owed a keep-alive, or the upstream's silence runs out
                    wait = min(told + interval, heard + silent_after) - loop.time()
                    try:
                        async with asyncio.timeout(wait if wait > 0 else 0):
                            data = await response.content.readany()
                    except TimeoutError:
                        now = loop.time()
                        if now - heard >= silent_after:
                            raise _UpstreamSilent() from None
                        told = now
                        yield translator.keepalive
                        continue
                    if not data:
                        break
                    piece = self._translated(flight, translator, normalizer, chunks(flight.decoder, data, done))
                    # nothing of this read stays referenced while the stream waits for the next
                    # one: an idle stream holds only its state (bench: idle streams)
                    del data
                    now = loop.time()
                    if piece is None and not said_done:  # no whole event: comments, or part of one
                        if now - heard >= silent_after:
                            raise _UpstreamSilent()
                        if now - told >= interval:
                            told = now
                            yield translator.keepalive
                        continue
                    heard = now
                    if piece:
                        told = now
                        yield piece
                    elif now - told >= interval:  # events that give the client nothing (yet)
                        told = now
                        yield translator.keepalive
                    if said_done:
                        # the answer is whole: its end is read a moment (only a body read to its
                        # end lets the connection be used again), not for as long as the
                        # upstream keeps it open
                        if not response.content.at_eof():
                            try:
                                async with asyncio.timeout(_AFTER_DONE):
                                    while await response.content.readany():
                                        pass
                            except TimeoutError:
                                pass
                        break
            except (aiohttp.ClientError, OSError, _UpstreamSilent) as exc:
                if flight.ended:  # our own end (the cap, the shutdown) closed the response
                    yield translator.fail(self._cut(flight))
                    return
                held = self._translated(flight, translator, normalizer, last_chunks(flight.decoder)) or b""
                tail, outcome = normalizer.close()
                if outcome.error is None:
                    # its last event was in (the finish reason, and the usage when sent): a
                    # connection reset after it (a proxy, a load balancer) does not unmake a
                    # whole answer, which the client would otherwise retry and pay for again
                    log.info("upstream connection ended after a whole answer", extra={
                        "entry": flight.entry_text, "error": type(exc).__name__})
                else:
                    log.warning("upstream died mid-stream", extra={
                        "entry": flight.entry_text, "upstream": _upstream_name(flight, self._upstream),
                        "error": type(exc).__name__})
                    flight.end("upstream died mid-stream", refused=not meter.delivered_anything)
                    yield held + translator.fail(BridgeError(
                        Kind.upstream_error, "The model provider's stream broke off before the answer was "
                        f"finished. Request id {flight.entry}.", code="stream_interrupted"))
                    return
            else:
                # a chunk held for an event that never came (flight.chunks: a surrogate pair cut there)
                held = self._translated(flight, translator, normalizer, last_chunks(flight.decoder)) or b""
                tail, outcome = normalizer.close()
            out = held + translator.feed(tail)
            if flight.ended:  # cut by its end, not a whole answer
                out += translator.fail(self._cut(flight))
            elif outcome.error is None:
                usage = meter.completed_usage() or self._unreported(flight)
                out += translator.finish(outcome.reason or glm.STOP, usage)
                flight.end("complete")
            else:
                out += translator.fail(outcome.error)
                flight.end(outcome.error.code or "broken", refused=not meter.delivered_anything)
            # settled after the answer is out: the client does not wait for the database; a
            # process that dies in between leaves a pending row the sweeper settles
            yield out
        finally:
            self.metrics.stream(-1)
            if not flight.ended:
                flight.client_gone()  # (which cancels the upstream request if it has not answered)

    @staticmethod
    def _translated(flight: Flight, translator: StreamTranslator, normalizer: glm.StreamNormalizer,
                    got: list[wire.Chunk]) -> bytes | None:
        """What the client gets for the upstream chunks `got` (those a read completed): None
        when there are none, b"" when they give the client nothing."""
        events: list[glm.Event] = []
        meter = flight.meter
        for chunk in got:
            meter.observe(chunk, delivered=True)
            events += normalizer.feed(chunk)
        if not events:
            return b"" if got else None
        if flight.first_token is None:
            flight.first_token = time.monotonic()
        return translator.feed(events)

    def _unreported(self, flight: Flight) -> wire.Usage:
        """A complete answer without usage (an upstream that sends it only when asked, and was
        not, or never): the client gets a whole answer; billing uses the estimate."""
        log.warning("upstream ended a complete answer without usage; billing the estimate",
                    extra={"entry": flight.entry_text, "upstream": _upstream_name(flight, self._upstream)})
        return flight.estimated_usage()

    @staticmethod
    def _call_prefix(flight: Flight) -> str:
        return f"call_{flight.entry_hex[:12]}_"

    # ---- plumbing --------------------------------------------------------------------------

    def _error(self, surface: Surface, error: BridgeError) -> Reply:
        status, headers, body = surface.error(error)
        return Reply(status=status, headers=headers, body=body)

    def _refused(self, surface: Surface, principal: Principal | None, error: BridgeError,
                 started: float) -> None:
        self.metrics.request(surface.name, "", error.status, time.monotonic() - started, None)
        if error.kind is Kind.quota_exhausted:
            self.metrics.refused("5h" if error.code == "1308" else "week")
        access.info("request", extra={
            "request_id": None, "surface": surface.name, "model": None, "status": error.status,
            "account_id": principal.account_id if principal else None, "prompt_tokens": 0,
            "completion_tokens": 0, "billed": 0, "overhead_ms": round((time.monotonic() - started) * 1000, 2),
            "upstream_ms": 0.0, "outcome": f"refused: {error.kind.value}", "code": error.code})
