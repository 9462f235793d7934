"""Counting for the journey: prompt estimates before forwarding, and what a stream delivered."""
from __future__ import annotations

import asyncio
from collections import OrderedDict

from service import estimate

from . import wire

# Texts this long are counted on a worker thread (tiktoken releases the GIL), so one big
# prompt does not stall every other stream on the event loop.
_OFFLOAD_CHARS = 32_000
_CACHE_MIN_CHARS = 256


class PromptEstimator:
    """o200k counts of a request's prompt pieces. Coding agents resend the same long history
    every turn, so counts of long pieces are kept in a bounded LRU keyed by the text's hash
    (not the text: 20,000 long prompts kept alive would be gigabytes). A hash collision can
    only skew one estimate, which the settlement corrects."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._cache: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._capacity = capacity
        estimate.encoding()  # load the ranks at start-up, not on the first request

    async def count_request(self, request: wire.ChatRequest) -> int:
        """The uncorrected estimate of a GLM request's prompt: messages, replayed reasoning,
        earlier tool calls and the tool schemas."""
        pieces: list[str] = []
        for m in request.messages:
            pieces.append(m.text())
            if isinstance(m.reasoning_content, str):
                pieces.append(m.reasoning_content)
            if isinstance(m.tool_calls, list):
                pieces.extend(c.function.name + c.function.arguments for c in m.tool_calls)
        if isinstance(request.tools, list):
            pieces.append(wire.encoder.encode(request.tools).decode())
        return await self.count(pieces, len(request.messages))

    async def count(self, pieces: list[str], messages: int) -> int:
        total = estimate.PER_REQUEST + estimate.PER_MESSAGE * messages
        todo: list[str] = []
        for piece in pieces:
            if len(piece) < _CACHE_MIN_CHARS:
                total += estimate.count(piece)
                continue
            key = (len(piece), hash(piece))
            cached = self._cache.get(key)
            if cached is None:
                todo.append(piece)
            else:
                self._cache.move_to_end(key)
                total += cached
        if todo:
            if sum(map(len, todo)) >= _OFFLOAD_CHARS:
                counts = await asyncio.to_thread(lambda: [estimate.count(p) for p in todo])
            else:
                counts = [estimate.count(p) for p in todo]
            for piece, n in zip(todo, counts):
                self._cache[(len(piece), hash(piece))] = n
                total += n
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return total


class StreamMeter:
    """What the upstream said about usage, and the completion text actually passed on."""

    __slots__ = ("usage", "finish_reason", "_delivered", "_reasoning", "upstream_id")

    def __init__(self) -> None:
        self.usage: wire.Usage | None = None
        self.finish_reason: str | None = None
        self.upstream_id: str | None = None
        self._delivered: list[str] = []
        self._reasoning: list[str] = []

    def observe(self, chunk: wire.Chunk, *, delivered: bool) -> None:
        if chunk.id and self.upstream_id is None:
            self.upstream_id = chunk.id
        if isinstance(chunk.usage, wire.Usage):
            self.usage = chunk.usage
        for choice in chunk.choices:
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
            if not delivered:
                continue
            delta = choice.delta
            if isinstance(delta.reasoning_content, str) and delta.reasoning_content:
                self._delivered.append(delta.reasoning_content)
                self._reasoning.append(delta.reasoning_content)
            if isinstance(delta.content, str) and delta.content:
                self._delivered.append(delta.content)
            if isinstance(delta.tool_calls, list):
                for call in delta.tool_calls:
                    function = call.function
                    if isinstance(function, wire.FunctionDelta):
                        if isinstance(function.name, str):
                            self._delivered.append(function.name)
                        if isinstance(function.arguments, str):
                            self._delivered.append(function.arguments)

    @property
    def delivered_anything(self) -> bool:
        return bool(self._delivered)

    def delivered_tokens(self) -> int:
        """Completion tokens delivered, counted piece by piece as they went out."""
        return sum(estimate.count(piece) for piece in self._delivered)

    def reasoning_tokens(self) -> int:
        return sum(estimate.count(piece) for piece in self._reasoning)

    def completed_usage(self) -> wire.Usage | None:
        """The upstream's usage, with the reasoning breakdown GLM leaves out filled in from our
        own count of the reasoning relayed (informational: billing uses completion_tokens)."""
        usage = self.usage
        if usage is None or usage.reasoning_tokens or not self._reasoning:
            return usage
        return wire.Usage(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens, prompt_tokens_details=usage.prompt_tokens_details,
            completion_tokens_details=wire.CompletionTokensDetails(
                reasoning_tokens=min(self.reasoning_tokens(), usage.completion_tokens)))
