"""The simulator's HTTP surface: Z.ai's chat completions, framed and paced from a Script."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

from .. import sse, wire
from .engine import FAULTS, BadDirective, Engine, Piece, Script, SimConfig


def _error(status: int, code: str, message: str) -> Response[bytes]:
    body = wire.encoder.encode(wire.ErrorBody(error=wire.ErrorDetail(code=code, message=message)))
    return Response(body, status_code=status, media_type="application/json")


def _delta(piece: Piece, first: bool) -> wire.Delta:
    role = "assistant" if first else msgspec.UNSET
    if piece.kind == "reasoning":
        return wire.Delta(role=role, reasoning_content=piece.text)
    if piece.kind == "content":
        return wire.Delta(role=role, content=piece.text)
    if piece.kind == "tool_start":
        return wire.Delta(role=role, tool_calls=[wire.ToolCallDelta(
            index=piece.index, id=piece.call_id, type="function",
            function=wire.FunctionDelta(name=piece.name, arguments=""))])
    return wire.Delta(role=role, tool_calls=[wire.ToolCallDelta(
        index=piece.index, function=wire.FunctionDelta(arguments=piece.text))])


USAGE_MODES = ("always", "when_asked", "never", "reject_field")


def _stream_usage(mode: str, chat: wire.ChatRequest) -> str:
    """Where a stream's usage goes: "finish" (GLM: in the finish chunk), "apart" (OpenAI-style:
    a chunk of its own, with no choices) or "none"."""
    if mode in ("always", "reject_field"):
        return "finish"
    if mode == "when_asked" and isinstance(chat.stream_options, wire.StreamOptions) \
            and chat.stream_options.include_usage:
        return "apart"
    return "none"


async def _stream(script: Script, completion_id: str, model: str, usage_at: str = "finish") -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(delta: wire.Delta, finish: str | msgspec.UnsetType = msgspec.UNSET,
              usage: wire.Usage | msgspec.UnsetType = msgspec.UNSET) -> bytes:
        return sse.frame(wire.encoder.encode(wire.Chunk(
            id=completion_id, created=created, model=model,
            choices=[wire.ChunkChoice(index=0, delta=delta, finish_reason=finish)], usage=usage)))

    if script.ttft:
        await asyncio.sleep(script.ttft)
    for i, piece in enumerate(script.pieces):
        if i == script.fault_at and script.faults:
            if "malformed" in script.faults:
                yield b'data: {"id": "' + completion_id.encode() + b'", "choices": [{"delta": {"cont\n\n'
            if "silence" in script.faults:
                await asyncio.sleep(script.silence)
            if "reset" in script.faults:
                # the bytes already sent reach the peer before the reset, as on a real network
                # (a reset in the same instant makes aiohttp drop data it had buffered)
                await asyncio.sleep(0.2)
                raise ConnectionResetError("simulated connection reset mid-stream")
        if i and script.interval:
            await asyncio.sleep(script.interval)
        yield chunk(_delta(piece, i == 0))
    final = wire.Delta(role="assistant", content="")
    usage = msgspec.UNSET if "no_usage" in script.faults or usage_at == "none" else script.usage
    if usage_at == "none":
        yield chunk(final, script.finish_reason)
    elif "usage_apart" in script.faults or usage_at == "apart":
        # some OpenAI-style upstreams send usage in a chunk of its own, with no choices
        yield chunk(final, script.finish_reason)
        yield sse.frame(wire.encoder.encode(wire.Chunk(
            id=completion_id, created=created, model=model, choices=[], usage=usage)))
    else:
        yield chunk(final, script.finish_reason, usage)
    if script.tail_delay:
        await asyncio.sleep(script.tail_delay)
    yield sse.DONE


def _message(script: Script) -> wire.ResponseMessage:
    reasoning = "".join(p.text for p in script.pieces if p.kind == "reasoning")
    content = "".join(p.text for p in script.pieces if p.kind == "content")
    calls: dict[int, wire.ToolCall] = {}
    for p in script.pieces:
        if p.kind == "tool_start":
            calls[p.index] = wire.ToolCall(id=p.call_id, function=wire.FunctionCall(name=p.name))
        elif p.kind == "tool_args":
            calls[p.index].function.arguments += p.text
    return wire.ResponseMessage(
        content=None if calls else content,
        reasoning_content=reasoning or msgspec.UNSET,
        tool_calls=list(calls.values()) or msgspec.UNSET)


class Stats(msgspec.Struct):
    """What the simulator served, so tests can check the bridge metered every request."""
    requests: int = 0
    completed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # per upstream key: requests being answered now, and the most ever at once
    in_flight: dict[str, int] = msgspec.field(default_factory=dict)
    max_in_flight: dict[str, int] = msgspec.field(default_factory=dict)


async def _counted(stats: Stats, key: str, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # The request stops counting just before [DONE] is sent: the bridge frees its slot when it
    # reads [DONE], and this generator's `finally` runs only after the server has sent that piece
    # and come back for another, so counting until then saw a slot's next holder arrive while
    # this one was still "in flight" (a cap of 2 measured as 3 under load). Counted this way the
    # simulator's in-flight span lies inside the bridge's slot hold, so a cap it sees exceeded is
    # one the bridge exceeded.
    counting = True
    try:
        async for piece in body:
            if piece == sse.DONE and counting:
                counting = False
                stats.in_flight[key] -= 1
            yield piece
    finally:
        if counting:
            stats.in_flight[key] -= 1


def _enter(stats: Stats, key: str) -> None:
    stats.in_flight[key] = stats.in_flight.get(key, 0) + 1
    stats.max_in_flight[key] = max(stats.max_in_flight.get(key, 0), stats.in_flight[key])


def create_app(config: SimConfig | None = None) -> Litestar:
    engine = Engine(config or SimConfig())
    stats = Stats()

    @get("/_sim/stats")
    async def sim_stats() -> Response:
        return Response(msgspec.json.encode(stats), media_type="application/json")

    @post(["/api/paas/v4/chat/completions", "/api/coding/paas/v4/chat/completions"],
          status_code=200)
    async def chat_completions(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        if not key or (engine.config.keys and key not in engine.config.keys):
            return _error(401, "1000", "Authentication failed")
        try:
            chat = wire.request_decoder.decode(await request.body())
        except msgspec.DecodeError as exc:
            return _error(400, "1210", f"Invalid API parameter: {exc}")
        if not chat.messages:
            return _error(400, "1214", "messages must not be empty")
        if isinstance(chat.stop, list) and len(chat.stop) > 1:
            return _error(400, "1210", "Invalid API parameter: stop supports at most 1 stop word")
        if isinstance(chat.tool_choice, str) and chat.tool_choice != "auto":
            return _error(400, "1210", "Invalid API parameter: tool_choice only supports auto")
        if engine.config.usage_mode == "reject_field" and chat.stream_options is not msgspec.UNSET:
            stats.requests += 1
            return _error(400, "1210", "Invalid API parameter: Unrecognized request argument "
                                       "supplied: stream_options")
        try:
            script = engine.plan(chat)
        except BadDirective as exc:
            return _error(400, "1210", str(exc))
        stats.requests += 1
        _enter(stats, key)
        streaming = False
        try:
            if script.header_delay:
                await asyncio.sleep(script.header_delay)
            response = await _answer(script, chat, key)
            streaming = isinstance(response, Stream)
            return response
        finally:
            if not streaming:
                stats.in_flight[key] -= 1

    async def _answer(script: Script, chat: wire.ChatRequest, key: str) -> Response:
        for fault in script.faults & FAULTS.keys():
            status, code, message = FAULTS[fault]
            return _error(status, code, message)
        completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        if not script.faults:
            stats.completed += 1
            stats.prompt_tokens += script.usage.prompt_tokens
            stats.completion_tokens += script.usage.completion_tokens
        headers = {"x-request-id": completion_id}
        if chat.stream:
            return Stream(_counted(stats, key, _stream(
                script, completion_id, chat.model, _stream_usage(engine.config.usage_mode, chat))),
                          media_type="text/event-stream",
                          headers={**headers, "cache-control": "no-cache"})
        if script.ttft:
            await asyncio.sleep(script.ttft)
        if "reset" in script.faults:
            raise ConnectionResetError("simulated connection reset")
        body = wire.Completion(
            id=completion_id, request_id=completion_id, created=int(time.time()), model=chat.model,
            choices=[wire.Choice(message=_message(script), finish_reason=script.finish_reason)],
            usage=msgspec.UNSET if "no_usage" in script.faults or engine.config.usage_mode == "never"
            else script.usage)
        return Response(wire.encoder.encode(body), media_type="application/json", headers=headers)

    return Litestar(route_handlers=[chat_completions, sim_stats], debug=False, logging_config=None,
                    openapi_config=None)
