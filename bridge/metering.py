"""Counting for the journey: what a prompt will probably cost, what it can cost at most, and
what a stream delivered.

Two numbers per prompt:
- the **estimate**: o200k tokens, corrected by the measured ratio of the upstream's reported
  prompt tokens to our count, per model and kind of text. Shown as the reservation.
- the **bound**: a proven upper bound of GLM's own count, held in the windows so that no
  window's posted + reserved can pass its allowance whatever the text. GLM-4.6's tokenizer is a
  byte-level BPE: every ordinary token covers at least one byte of UTF-8, so a text has at most
  as many tokens as bytes. Its chat template adds role and format tokens per message (at most
  BOUND_PER_MESSAGE), a few per request (BOUND_PER_REQUEST: `[gMASK]<sop>`, the assistant turn,
  thinking tags), a fixed preamble of about 450 bytes when tools are offered
  (BOUND_TOOL_PREAMBLE), renders tool schemas and tool-call arguments as JSON or key/value tags
  with at most one extra token per byte (hence twice their bytes), and an image costs at most
  BOUND_PER_IMAGE.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import math
from collections import OrderedDict

import msgspec
from msgspec import UNSET

from . import tokens, wire

# Texts this long are counted on a worker thread (tiktoken releases the GIL), so one big
# prompt does not stall every other stream on the event loop.
_OFFLOAD_CHARS = 32_000
_CACHE_MIN_CHARS = 256
_SHORT_CAPACITY = 4096

BOUND_PER_REQUEST = 16
BOUND_PER_MESSAGE = 32
BOUND_TOOL_PREAMBLE = 1024
BOUND_PER_IMAGE = 4096


class PromptCount(msgspec.Struct, frozen=True):
    raw: int  # uncorrected o200k estimate
    bound: int  # proven upper bound of the upstream's count
    kind: str  # ascii | mixed | wide: the text's kind, for calibration


def text_kind(chars: int, utf8_bytes: int) -> str:
    """Tokenizers differ most on non-Latin text: CJK and emoji take several bytes a character
    and tokenize differently from one tokenizer to the next."""
    if chars == 0 or utf8_bytes <= chars * 1.1:
        return "ascii"
    return "wide" if utf8_bytes >= chars * 2 else "mixed"


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class PromptEstimator:
    """o200k counts of a request's prompt pieces. Coding agents resend the same long history
    every turn, so counts of long pieces are kept in a bounded LRU keyed by the text's hash
    (not the text: 20,000 long prompts kept alive would be gigabytes). A hash collision can
    only skew one estimate (never the bound, computed from the text itself)."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._cache: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._capacity = capacity
        # short pieces (a system prompt's lines, "Say hello.", a tool's name) recur in every
        # request of a conversation: kept by their text (at most _SHORT_CAPACITY x 256 chars),
        # so no collision can skew them, and evicted all at once when full (no LRU upkeep)
        self._short: dict[str, int] = {}
        tokens.encoding()  # load the ranks at start-up, not on the first request

    async def count_request(self, request: wire.ChatRequest) -> PromptCount:
        """The prompt of a GLM request: messages, replayed reasoning, earlier tool calls and
        the tool schemas."""
        plain: list[str] = []
        structured: list[str] = []  # JSON the template may re-render: bound at twice its bytes
        images = 0
        for m in request.messages:
            plain.append(m.text())
            images += m.images()
            if isinstance(m.reasoning_content, str):
                plain.append(m.reasoning_content)
            if isinstance(m.tool_calls, list):
                structured.extend(c.function.name + c.function.arguments for c in m.tool_calls)
        preamble = 0
        if isinstance(request.tools, list) and request.tools:
            structured.append(wire.encoder.encode(request.tools).decode())
            preamble = BOUND_TOOL_PREAMBLE
        n = len(request.messages)
        raw = tokens.PER_REQUEST + tokens.PER_MESSAGE * n + await self.count(plain + structured)
        plain_bytes = sum(map(_utf8_len, plain))
        bound = (BOUND_PER_REQUEST + preamble + BOUND_PER_MESSAGE * n + BOUND_PER_IMAGE * images
                 + plain_bytes + 2 * sum(map(_utf8_len, structured)))
        return PromptCount(raw=raw, bound=max(bound, raw),
                           kind=text_kind(sum(map(len, plain)), plain_bytes))

    async def count(self, pieces: list[str]) -> int:
        total = 0
        todo: list[str] = []
        for piece in pieces:
            if len(piece) < _CACHE_MIN_CHARS:
                n = self._short.get(piece)
                if n is None:
                    n = tokens.count(piece)
                    if len(self._short) >= _SHORT_CAPACITY:
                        self._short.clear()
                    self._short[piece] = n
                total += n
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
                counts = await asyncio.to_thread(lambda: [tokens.count_in_pieces(p) for p in todo])
            else:
                counts = [tokens.count(p) for p in todo]
            for piece, n in zip(todo, counts):
                self._cache[(len(piece), hash(piece))] = n
                total += n
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return total


class _Own:
    """One account's recent ratios for one model and kind, and their median."""
    __slots__ = ("ratios", "ratio")

    def __init__(self) -> None:
        self.ratios: collections.deque[float] = collections.deque(maxlen=Calibration.OWN_SAMPLES)
        self.ratio: float | None = None


class Calibration:
    """The ratio of the upstream's reported prompt tokens to our o200k count, per model and kind
    of text, from recent settlements.

    An account's estimate follows its own text: once it has `OWN_MIN` settlements of its own for
    a model and kind, the median of its last `OWN_SAMPLES` is its ratio, whatever other accounts
    send. A kind is coarse (Tamil and Chinese are both "wide", runs of newlines and code both
    "ascii", and the upstream counts them very differently), so a shared ratio let one account's
    16 requests double or halve another's estimate: a prompt that fit refused as too long, an
    abandoned request billed twice or half its prompt (tests/test_metering_rules.py).

    Before that, the shared ratio: the median of the last `SAMPLES` observations of every
    account, of which one account may hold at most `PER_ACCOUNT`, within [MIN_RATIO, MAX_RATIO].
    Neither is ever the account's safety: admission holds the proven bound regardless.
    """

    SAMPLES = 256
    PER_ACCOUNT = 16
    MIN_RATIO, MAX_RATIO = 0.5, 3.0
    OWN_SAMPLES = 16
    OWN_MIN = 3
    OWN_KEPT = 10_000  # accounts' series (per model and kind) kept; the least recently seen go

    def __init__(self) -> None:
        self._samples: dict[tuple[str, str], collections.deque[tuple[int, float]]] = {}
        # per model and kind: the samples' ratios kept sorted, and each account's count of
        # samples, so an observation costs a bisection, not a scan and a sort of all of them
        self._sorted: dict[tuple[str, str], list[float]] = {}
        self._held: dict[tuple[str, str], dict[int, int]] = {}
        self._ratio: dict[tuple[str, str], float] = {}
        self._error: dict[tuple[str, str], tuple[int, float]] = {}
        self._own: OrderedDict[tuple[int, str, str], _Own] = OrderedDict()

    def ratio(self, model: str, kind: str, account_id: int | None = None) -> float:
        if account_id is not None:
            own = self._own.get((account_id, model, kind))
            if own is not None and own.ratio is not None:
                return own.ratio
        return self._ratio.get((model, kind), 1.0)

    def correct(self, model: str, kind: str, raw: int, account_id: int | None = None) -> int:
        return max(1, math.ceil(raw * self.ratio(model, kind, account_id)))

    def observe(self, model: str, kind: str, account_id: int, raw: int, reported: int) -> None:
        if raw <= 0 or reported <= 0:
            return
        key = (model, kind)
        n, error = self._error.get(key, (0, 0.0))
        estimate = self.correct(model, kind, raw, account_id)  # what this account was told
        self._error[key] = (n + 1, error + abs(estimate - reported) / reported)
        sample = reported / raw
        self._observe_own(account_id, model, kind, sample)
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = collections.deque(maxlen=self.SAMPLES)
            self._sorted[key], self._held[key] = [], {}
        ordered, held = self._sorted[key], self._held[key]
        if held.get(account_id, 0) >= self.PER_ACCOUNT:
            # this account's oldest gives way, not another tenant's
            i = next(i for i, (account, _) in enumerate(samples) if account == account_id)
            self._forget(ordered, held, samples[i])
            del samples[i]
        elif len(samples) == self.SAMPLES:
            self._forget(ordered, held, samples[0])  # the deque drops it on the append below
        samples.append((account_id, sample))
        bisect.insort(ordered, sample)
        held[account_id] = held.get(account_id, 0) + 1
        self._ratio[key] = _clamped_median(ordered, self.MIN_RATIO, self.MAX_RATIO)

    def _observe_own(self, account_id: int, model: str, kind: str, sample: float) -> None:
        key = (account_id, model, kind)
        own = self._own.get(key)
        if own is None:
            own = self._own[key] = _Own()
            if len(self._own) > self.OWN_KEPT:
                self._own.popitem(last=False)
        else:
            self._own.move_to_end(key)
        own.ratios.append(sample)
        if len(own.ratios) >= self.OWN_MIN:
            own.ratio = _clamped_median(sorted(own.ratios), self.MIN_RATIO, self.MAX_RATIO)

    @staticmethod
    def _forget(ordered: list[float], held: dict[int, int], sample: tuple[int, float]) -> None:
        account, ratio = sample
        del ordered[bisect.bisect_left(ordered, ratio)]
        if held[account] == 1:
            del held[account]
        else:
            held[account] -= 1

    def report(self) -> dict[str, dict[str, float]]:
        """Per model and kind: samples, current ratio, mean absolute relative error."""
        return {
            f"{model}/{kind}": {"samples": n, "ratio": round(self.ratio(model, kind), 4),
                                "mean_abs_error": round(error / n, 4)}
            for (model, kind), (n, error) in sorted(self._error.items())
        }


def _clamped_median(ordered: list[float], low: float, high: float) -> float:
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return min(max(median, low), high)


# The largest count the ledger can hold: its settlement SQL takes int4 arrays.
MAX_COUNT = 2**31 - 1


def _within(n: int) -> int:
    return 0 if n < 0 else MAX_COUNT if n > MAX_COUNT else n


def bounded(usage: wire.Usage) -> wire.Usage:
    """The upstream's usage with every count within 0..MAX_COUNT. Clamped here, where the
    upstream's word enters the bridge, and nowhere else, so the client, the calibration and the
    ledger all see the same numbers: a negative count would lower the totals shown and billed,
    and one past int4 could never be settled (every tick would fail on it and the entry would
    stay pending until the sweeper expired it)."""
    counts = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
              usage.cached_tokens, usage.reasoning_tokens)
    if all(0 <= n <= MAX_COUNT for n in counts):
        return usage  # the usual case: nothing to copy
    prompt, completion, total, cached, reasoning = map(_within, counts)
    return wire.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=total,
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=cached)
        if isinstance(usage.prompt_tokens_details, wire.PromptTokensDetails) else usage.prompt_tokens_details,
        completion_tokens_details=wire.CompletionTokensDetails(reasoning_tokens=reasoning)
        if isinstance(usage.completion_tokens_details, wire.CompletionTokensDetails)
        else usage.completion_tokens_details)


class StreamMeter:
    """What the upstream said about usage, and the completion text actually passed on."""

    __slots__ = ("usage", "upstream_id", "_delivered", "_reasoning", "_failed")

    def __init__(self) -> None:
        self.usage: wire.Usage | None = None
        self.upstream_id: str | None = None
        self._delivered: list[str] = []
        self._reasoning: list[str] = []
        # the upstream reported a failure mid-stream: the normaliser passes nothing on after it
        # (glm.StreamNormalizer), so nothing after it counts as delivered
        self._failed = False

    def observe(self, chunk: wire.Chunk, *, delivered: bool) -> None:
        if chunk.id and self.upstream_id is None:
            self.upstream_id = chunk.id
        if isinstance(chunk.usage, wire.Usage):
            self.usage = bounded(chunk.usage)
        if chunk.error is not UNSET and wire.stream_failure(chunk) is not None:
            self._failed = True
        if not delivered or self._failed:
            return
        for choice in chunk.choices:
            delta = choice.delta
            reasoning = delta.reasoning_content
            if not (isinstance(reasoning, str) and reasoning):
                reasoning = delta.reasoning  # vLLM's name for it (wire.Delta), read as glm.py does
            if isinstance(reasoning, str) and reasoning:
                self._delivered.append(reasoning)
                self._reasoning.append(reasoning)
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
        return sum(tokens.count(piece) for piece in self._delivered)

    def reasoning_tokens(self) -> int:
        return sum(tokens.count(piece) for piece in self._reasoning)

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
