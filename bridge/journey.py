"""A request's whole journey, the same for every surface:

    authenticate -> admit -> forward -> relay -> settle

Surfaces differ only in their translator (bridge/surfaces/*). Every request that is admitted
leaves exactly one ledger entry, settled exactly once, whatever happens to the client, the
upstream or this process (the sweeper settles what a dead process left pending).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from typing import AsyncIterator, Callable, Protocol

import aiohttp
import asyncpg
import msgspec

from service.accounts import Authenticator, Principal
from service.config import Config
from service.estimate import Calibration
from service.ledger import Admission, Ledger, Usage, iso_utc

from . import sse, wire
from .errors import BridgeError, Kind
from .metering import PromptEstimator, StreamMeter
from .models import CATALOG, ModelInfo, ModelResolver
from .upstream import Upstream, UpstreamResponse

log = logging.getLogger("codeplan.journey")


class StreamTranslator(Protocol):
    content_type: str
    keepalive: bytes

    def start(self) -> bytes:
        """What goes out before the first upstream byte (Anthropic's message_start)."""
    def feed(self, chunk: wire.Chunk) -> bytes: ...
    def finish(self, usage: wire.Usage) -> bytes: ...
    def fail(self, error: BridgeError) -> bytes: ...


class Surface(Protocol):
    """What a client protocol gives the journey."""
    name: str

    def parse(self, body: bytes) -> tuple[wire.ChatRequest, int | None]:
        """The GLM request (model as the client named it) and the client's max_tokens."""
    def stream(self, model: str, request_id: str, prompt_estimate: int) -> StreamTranslator: ...
    def complete(self, completion: wire.Completion, model: str, usage: wire.Usage) -> bytes: ...
    def error(self, error: BridgeError) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of an error in this protocol's own shape."""


class Reply(msgspec.Struct):
    status: int
    headers: dict[str, str]
    media_type: str = "application/json"
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


class _Admitted(msgspec.Struct):
    """What settlement needs to know about an admitted request."""
    entry: uuid.UUID
    model: ModelInfo
    shown_model: str
    raw_prompt: int  # uncorrected o200k estimate, for calibration
    prompt_estimate: int
    meter: StreamMeter | None = None  # what a stream has delivered, for heartbeats
    # the next heartbeat: a timer, not a task, since most requests end before it fires
    keeper: asyncio.TimerHandle | None = None
    settling: bool = False

    def stop_keeper(self) -> None:
        self.settling = True
        if self.keeper is not None:
            self.keeper.cancel()
            self.keeper = None


class _UpstreamDied(Exception):
    pass


def _chunks(decoder: sse.SSEDecoder, data: bytes, admitted: _Admitted) -> list[wire.Chunk]:
    """The GLM chunks completed by `data`. A malformed one is skipped (the rest of the stream
    is still good); the `[DONE]` sentinel carries nothing."""
    chunks = []
    for event in decoder.feed(data):
        if event.data == b"[DONE]":
            continue
        try:
            chunks.append(wire.chunk_decoder.decode(event.data))
        except msgspec.DecodeError:
            log.warning("malformed upstream chunk skipped", extra={"entry": str(admitted.entry)})
    return chunks


def _close_if_opened(opening: asyncio.Future) -> None:
    """An upstream response that arrived after nobody wanted it is closed, not leaked."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class Journey:
    def __init__(self, *, config: Config, auth: Authenticator, ledger: Ledger,
                 upstream: Upstream, calibration: Calibration) -> None:
        self._config = config
        self._auth = auth
        self._ledger = ledger
        self._upstream = upstream
        self._calibration = calibration
        self._models = ModelResolver(config.model_aliases, claude=config.claude_model,
                                     claude_haiku=config.claude_haiku_model)
        self._estimator = PromptEstimator()
        self._background: set[asyncio.Task] = set()
        self._drains = 0

    @property
    def authenticator(self) -> Authenticator:
        return self._auth

    # ---- the journey ---------------------------------------------------------------------

    async def handle(self, surface: Surface, key: str, body: bytes) -> Reply:
        try:
            principal = await self._auth.authenticate(key)
            if principal is None:
                raise BridgeError(Kind.authentication, "Invalid API key. Create one with "
                                  "`codeplan keys create` and send it as a Bearer token.")
            request, max_tokens = surface.parse(body)
            admitted = await self._admit(surface, principal, request, max_tokens)
        except BridgeError as error:
            return self._error(surface, error)

        # forwarded from here on: every exit settles `admitted.entry`
        opening: asyncio.Future | None = None
        try:
            if not request.stream:
                response = await self._upstream.open(request, str(admitted.entry))
            else:
                # a quick refusal keeps its HTTP status; a slow upstream must not keep the
                # client waiting for headers (Kilo gives up after 10 s)
                opening = asyncio.ensure_future(self._upstream.open(request, str(admitted.entry)))
                await asyncio.wait({opening}, timeout=self._config.header_wait)
                response = opening.result() if opening.done() else None
        except BridgeError as error:
            await self._void(admitted, reason=f"upstream refused: {error.kind.value}")
            return self._error(surface, error)
        except BaseException:
            if opening is not None:
                opening.cancel()
            self._spawn(self._void(admitted, reason="cancelled before forwarding"))
            raise
        if not request.stream:
            return await self._complete(surface, response, admitted)
        translator = surface.stream(admitted.shown_model, admitted.entry.hex, admitted.prompt_estimate)
        stream = self._relay(translator, response, admitted) if response is not None \
            else self._relay_when_open(translator, opening, admitted)  # type: ignore[arg-type]
        return Reply(status=200, media_type=translator.content_type,
                     headers={"cache-control": "no-cache", "x-request-id": str(admitted.entry)},
                     stream=stream)

    async def count_tokens(self, surface: Surface, parse: Callable[[bytes], wire.ChatRequest],
                           key: str, body: bytes) -> tuple[Reply, int | None]:
        """The prompt estimate admission would reserve for this request, corrected by the
        measured GLM ratio: what `count_tokens` answers."""
        try:
            if await self._auth.authenticate(key) is None:
                raise BridgeError(Kind.authentication, "Invalid API key.")
            request = parse(body)
            model = self._models.resolve(request.model, tuple(CATALOG))
            raw = await self._estimator.count_request(request)
            return Reply(status=200, headers={}), self._calibration.correct(model.id, raw)
        except BridgeError as failure:
            return self._error(surface, failure), None

    async def _admit(self, surface: Surface, principal: Principal, request: wire.ChatRequest,
                     max_tokens: int | None) -> _Admitted:
        shown_model = request.model
        model = self._models.resolve(request.model, principal.models)
        request.model = model.id
        raw = await self._estimator.count_request(request)
        prompt = self._calibration.correct(model.id, raw)
        if prompt >= model.context_window:
            raise BridgeError(
                Kind.context_length,
                f"This model's maximum context length is {model.context_window} tokens. However, "
                f"your messages resulted in {prompt} tokens. Please reduce the length of the messages.",
                param="messages", limit=model.context_window, requested=prompt)
        # the reservation covers the most the upstream may produce: never more than it can
        request.max_tokens = min(max_tokens or model.max_output, model.max_output,
                                 model.context_window - prompt)
        entry = uuid.uuid4()
        admission = await self._ledger.admit(
            entry, subscription_id=principal.subscription_id, api_key_id=principal.api_key_id,
            surface=surface.name, model=model.id, prompt_estimate=prompt,
            reserve=prompt + request.max_tokens)
        if not admission.admitted:
            raise self._refusal(admission)
        admitted = _Admitted(entry=entry, model=model, shown_model=shown_model, raw_prompt=raw,
                             prompt_estimate=prompt)
        # the lease is renewed for as long as the request lives, whatever it is waiting on: a
        # long silence must not let the sweeper expire a request the upstream is still serving
        self._schedule_heartbeat(admitted)
        return admitted

    @staticmethod
    def _refusal(admission: Admission) -> BridgeError:
        window = "5 hour" if admission.window_kind == "5h" else "weekly"
        if admission.outcome == "window_full":
            assert admission.resets_at is not None
            wait = (admission.resets_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
            return BridgeError(
                Kind.quota_exhausted,
                f"Usage limit reached for the {window} window. Your limit will reset at "
                f"{iso_utc(admission.resets_at)} (UTC).",
                code="1308" if admission.window_kind == "5h" else "1310", retry_after=max(1.0, wait))
        if admission.outcome == "too_large":
            return BridgeError(
                Kind.too_large,
                f"This request could reserve more tokens than the whole {window} window allows "
                f"({admission.allowance}); lower max_tokens or shorten the prompt.", param="max_tokens")
        if admission.outcome == "concurrency":
            return BridgeError(Kind.concurrency,
                               f"Too many requests in flight for this plan (at most {admission.allowance}).",
                               code="1302", retry_after=1)
        return BridgeError(Kind.permission, "This account has no active subscription.")

    # ---- relay and settle ----------------------------------------------------------------

    async def _relay_when_open(self, translator: StreamTranslator, opening: asyncio.Future,
                               admitted: _Admitted) -> AsyncIterator[bytes]:
        """The client has its headers; the upstream has not answered yet. Keep the stream alive
        until it does, then relay, or turn its refusal into the protocol's error event."""
        handed_over = False
        try:
            yield translator.start() or translator.keepalive
            while not (await asyncio.wait({opening}, timeout=self._config.keepalive_interval))[0]:
                yield translator.keepalive
            try:
                response = opening.result()
            except BridgeError as error:
                handed_over = True
                self._spawn(self._void(admitted, reason=f"upstream refused: {error.kind.value}"))
                yield translator.fail(error)
                return
            handed_over = True
            async with contextlib.aclosing(self._relay(translator, response, admitted, started=True)) as relay:
                async for piece in relay:
                    yield piece
        finally:
            if not handed_over:
                # the client left (or we were cancelled) before the upstream answered
                opening.cancel()
                opening.add_done_callback(_close_if_opened)
                self._spawn(self._void(admitted, reason="client left before the first byte"))

    async def _relay(self, translator: StreamTranslator, response: UpstreamResponse,
                     admitted: _Admitted, *, started: bool = False) -> AsyncIterator[bytes]:
        decoder = sse.SSEDecoder()
        meter = admitted.meter = StreamMeter()
        content = response.content
        settled = False
        keepalive = self._config.keepalive_interval
        idle_limit = self._config.upstream_timeout
        silence = 0.0
        try:
            opening = b"" if started else translator.start()
            if opening:
                yield opening
            try:
                while True:
                    try:
                        async with asyncio.timeout(keepalive):
                            data = await content.readany()
                    except TimeoutError:
                        silence += keepalive
                        if silence >= idle_limit:
                            raise _UpstreamDied("upstream silent for too long") from None
                        yield translator.keepalive
                        continue
                    if not data:
                        break
                    silence = 0.0
                    out = b""
                    for chunk in _chunks(decoder, data, admitted):
                        meter.observe(chunk, delivered=True)
                        out += translator.feed(chunk)
                    if out:
                        yield out
                response.release()
            except (aiohttp.ClientError, OSError, _UpstreamDied) as exc:
                log.warning("upstream died mid-stream",
                            extra={"entry": str(admitted.entry), "error": type(exc).__name__})
                response.close()
            # (on cancellation the response stays open: _client_gone may drain it)

            # settled after the answer is out: the client does not wait for the database; a
            # process that dies in between leaves a pending row the sweeper settles
            usage = meter.completed_usage()
            if usage is not None:
                self._spawn(self._post_upstream(admitted, usage, meter.upstream_id))
                settled = True
                yield translator.finish(usage)
            else:
                # the upstream ended without its usage: bill what we can prove we delivered
                self._spawn(self._post_delivered(admitted, meter, reason="upstream ended without usage"))
                settled = True
                yield translator.fail(BridgeError(
                    Kind.upstream_error, "The model provider's stream broke off before it "
                    f"finished (finish_reason: network_error). Request id {admitted.entry}.",
                    code="network_error"))
        finally:
            if not settled:
                # the client went away (or we were cancelled): settle without awaiting here
                self._client_gone(response, decoder, meter, admitted)

    def _client_gone(self, response: UpstreamResponse, decoder: sse.SSEDecoder,
                     meter: StreamMeter, admitted: _Admitted) -> None:
        usage = meter.completed_usage()
        if usage is not None:
            self._spawn(self._post_upstream(admitted, usage, meter.upstream_id))
        elif not meter.delivered_anything:
            # nothing reached the client: stop the upstream, nothing was served
            response.close()
            self._spawn(self._void(admitted, reason="client left before the first byte"))
        elif self._drains >= self._config.max_drains:
            response.close()
            self._spawn(self._post_delivered(admitted, meter, reason="client left; drain capacity full"))
        else:
            self._spawn(self._drain(response, decoder, meter, admitted))

    async def _drain(self, response: UpstreamResponse, decoder: sse.SSEDecoder,
                     meter: StreamMeter, admitted: _Admitted) -> None:
        """The client left mid-stream: keep reading the upstream, bounded, for its usage."""
        self._drains += 1
        try:
            async with asyncio.timeout(self._config.drain_timeout):
                while data := await response.content.readany():
                    for chunk in _chunks(decoder, data, admitted):
                        meter.observe(chunk, delivered=False)
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        finally:
            self._drains -= 1
            response.close()
        usage = meter.completed_usage()
        if usage is not None:
            await self._post_upstream(admitted, usage, meter.upstream_id)
        else:
            await self._post_delivered(admitted, meter, reason="client left; upstream gave no usage")

    async def _complete(self, surface: Surface, response: UpstreamResponse,
                        admitted: _Admitted) -> Reply:
        try:
            try:
                body = await response.read()
            finally:
                response.release()
            completion = wire.completion_decoder.decode(body)
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError) as exc:
            await self._void(admitted, reason=f"upstream failed: {type(exc).__name__}")
            return self._error(surface, BridgeError(
                Kind.upstream_error, f"The model provider failed to answer. Request id {admitted.entry}."))
        except BaseException:
            self._spawn(self._void(admitted, reason="cancelled"))
            raise
        meter = StreamMeter()
        meter.observe(wire.Chunk(usage=completion.usage, choices=[wire.ChunkChoice(delta=wire.Delta(
            content=choice.message.content, reasoning_content=choice.message.reasoning_content))
            for choice in completion.choices]), delivered=True)
        usage = meter.completed_usage()
        if usage is not None:
            self._spawn(self._post_upstream(admitted, usage, completion.id or None))
        else:
            usage = self._delivered_usage(admitted, meter)
            self._spawn(self._post_delivered(admitted, meter, reason="upstream gave no usage"))
        return Reply(status=200, headers={"x-request-id": str(admitted.entry)},
                     body=surface.complete(completion, admitted.shown_model, usage))

    async def _post_upstream(self, admitted: _Admitted, usage: wire.Usage,
                             upstream_id: str | None) -> None:
        """Settle at the upstream's own numbers: they are what we are billed."""
        admitted.stop_keeper()
        self._calibration.observe(admitted.model.id, admitted.raw_prompt, usage.prompt_tokens)
        await self._ledger.post(admitted.entry, Usage(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens),
            estimated=False, reason="upstream usage", upstream_request_id=upstream_id)

    @staticmethod
    def _delivered_usage(admitted: _Admitted, meter: StreamMeter) -> wire.Usage:
        completion = meter.delivered_tokens()
        return wire.Usage(prompt_tokens=admitted.prompt_estimate, completion_tokens=completion,
                          total_tokens=admitted.prompt_estimate + completion)

    async def _post_delivered(self, admitted: _Admitted, meter: StreamMeter, *, reason: str) -> None:
        """No usage from the upstream: bill the prompt estimate and the tokens delivered."""
        admitted.stop_keeper()
        usage = self._delivered_usage(admitted, meter)
        await self._ledger.post(admitted.entry, Usage(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens),
            estimated=True, reason=reason, upstream_request_id=meter.upstream_id)

    async def _void(self, admitted: _Admitted, *, reason: str) -> None:
        admitted.stop_keeper()
        await self._ledger.void(admitted.entry, reason=reason)

    def _schedule_heartbeat(self, admitted: _Admitted) -> None:
        admitted.keeper = asyncio.get_running_loop().call_later(
            self._config.heartbeat_interval, lambda: self._spawn(self._heartbeat(admitted)))

    async def _heartbeat(self, admitted: _Admitted) -> None:
        """Extend the lease and record the completion tokens delivered so far; then the next."""
        admitted.keeper = None
        if admitted.settling:
            return
        delivered = admitted.meter.delivered_tokens() if admitted.meter is not None else 0
        try:
            still_pending = await self._ledger.heartbeat(admitted.entry, delivered)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("heartbeat failed", extra={"entry": str(admitted.entry), "error": type(exc).__name__})
            still_pending = True
        if still_pending and not admitted.settling:
            self._schedule_heartbeat(admitted)

    # ---- plumbing ------------------------------------------------------------------------

    def _error(self, surface: Surface, error: BridgeError) -> Reply:
        status, headers, body = surface.error(error)
        return Reply(status=status, headers=headers, body=body)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background settlement failed", exc_info=task.exception())

    async def drain_background(self, timeout: float = 10.0) -> None:
        """At shutdown: let settlements in flight finish (the sweeper covers the rest)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
